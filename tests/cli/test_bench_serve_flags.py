"""`bench serve --launch` builds its engine from `flexserve serve`'s placement flags."""
import argparse


def test_bench_serve_takes_the_placement_flags_of_serve():
    from flexserve.cli.bench import register, serve_bench_settings

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["bench", "serve", "--launch", "--model", "dummy:opt-125m",
                              "--percent", "40", "60", "100", "0", "100", "0"])
    policy = serve_bench_settings(args).engine.policy
    assert policy is not None and policy.w_gpu_percent == 40 and policy.w_cpu_percent == 60
    plain = parser.parse_args(["bench", "serve", "--launch", "--model", "dummy:opt-125m"])
    assert serve_bench_settings(plain).engine.policy is None  # no flags: resident weights

"""What the CLI prints for a newcomer: numbered completions, what a dummy model's output is, the defaults in
--help, the version, and a loading line while the model loads."""
import re

import pytest


def test_n_completions_are_separated_and_numbered(cli):
    rc, out, err = cli("generate", "--model", "dummy:opt-125m", "--device", "cpu", "--max-tokens", "3", "-n", "2",
                       "--temperature", "1", "--seed", "1", "hi", "there")
    assert rc == 0
    headers = [line for line in out.splitlines() if line.startswith("---")]
    assert headers == ["--- prompt 1, completion 1 ---", "--- prompt 1, completion 2 ---",
                       "--- prompt 2, completion 1 ---", "--- prompt 2, completion 2 ---"]
    bodies = [line for line in out.splitlines() if line and not line.startswith("---")]
    assert len(bodies) == 4 and all(len(b.split()) == 3 and b.replace(" ", "").isdigit() for b in bodies)
    # A dummy model says, once, that its output is the token ids of random weights; loading is announced.
    assert err.count("random weights") == 1 and "token ids" in err
    assert re.search(r"loading dummy:opt-125m .*\n.*loaded in [\d.]+ s", err)


def test_one_completion_prints_just_the_text(cli):
    rc, out, _ = cli("generate", "--model", "dummy:opt-125m", "--device", "cpu", "--max-tokens", "2", "hi")
    assert rc == 0 and len(out.strip().splitlines()) == 1 and not out.startswith("---")


def test_version(cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli("--version")
    assert e.value.code == 0 and re.fullmatch(r"flexserve \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


@pytest.mark.parametrize("verb, expected", [
    (["generate"], ["--max-tokens MAX_TOKENS", "(default: 64)", "(default 0: greedy", "server's default is 1"]),
    (["serve"], ["(default: 8000)", "(default 127.0.0.1", "(default: 30.0)", "at temperature 1"]),
    (["ppl"], ["(default: 512)", "(default: 256)"]),
])
def test_help_shows_defaults(capsys, verb, expected):
    from flexserve.cli import main

    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for part in expected:
        assert " ".join(part.split()) in text, part
    assert "(default: None)" not in text

"""Run the benchmarks of bench/RESULTS.md by the question they answer (the entries of bench/entries.py).

    python bench/run.py list                               # every entry: machine, estimated seconds, question
    python bench/run.py show ENTRY                         # its commands, machine, wheels, peer, files
    python bench/run.py run ENTRY... [--out DIR]           # run them in turn, one log each under DIR
    python bench/run.py pack --budget-s 540 [ENTRY...]     # group them into device calls that fit a time limit

ENTRY may be a glob pattern ('planner-validation-*'). `run` writes DIR/ENTRY.log (every command with its
output, progress bars removed, and its duration), DIR/machine.txt (GPUs, CPUs, memory) and DIR/results.jsonl
(one line per command: exit status, seconds, its result lines); DIR defaults to bench/out/. It checks first
that the machine has the GPUs, the peer scripts and the wheels every entry needs, and runs nothing if not.

The environment is set up once per `run`, the same for every entry (`setup_environment`):
  - the repository on PYTHONPATH, unbuffered output, NVLink multicast off for NCCL and symmetric memory;
  - wheels: every .whl in .whl/ (or FLEXSERVE_WHEELS_DIR) is installed without network or dependencies into
    bench/out/site/ (or FLEXSERVE_SITE_DIR), again only when the set of wheels changes, and put on PYTHONPATH.
    This is how packages a GPU machine lacks travel, e.g. flexgen==0.1.8, pulp and orloge for FlexGen;
  - peers: other projects' benchmark scripts that are not part of this repository (FlexGen's runner,
    run_flexgen.py) are read from .peers/ (or FLEXSERVE_PEERS_DIR): copy them there before a device call.

One file past the usual size on purpose: it is copied onto bare GPU machines and must run there with the
standard library alone, before anything else is installed.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from entries import BY_NAME, ENTRIES, MACHINES, Cmd, Entry  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "out"
SETUP_S = 30  # what a call spends before its first entry: machine facts, wheels
RESULT_LINE = re.compile(r"^([A-Z_]*(RESULT|VALIDATION)) (\{.*\})\s*$")
PROGRESS_LINE = re.compile(r"\d+/\d+ \[[\d:]+<|[?\d.]+\w*/s\]|s/\w+\]")  # tqdm bars


class BenchError(Exception):
    """A precondition of a run is not met: the message says what is missing."""


# --- names --------------------------------------------------------------------------------------------------------
def resolve(names: list[str]) -> list[Entry]:
    """Entries by name or glob pattern, in the order given, each once."""
    out: list[Entry] = []
    for name in names:
        hits = [BY_NAME[name]] if name in BY_NAME else [e for e in ENTRIES if fnmatch.fnmatchcase(e.name, name)]
        if not hits:
            raise BenchError(f"unknown entry {name!r}: `python bench/run.py list` names them")
        out += [e for e in hits if e not in out]
    return out


# --- commands -----------------------------------------------------------------------------------------------------
def peers_dir() -> Path:
    return Path(os.environ.get("FLEXSERVE_PEERS_DIR") or REPO / ".peers")


def wheels_dir() -> Path:
    return Path(os.environ.get("FLEXSERVE_WHEELS_DIR") or REPO / ".whl")


def site_dir() -> Path:
    return Path(os.environ.get("FLEXSERVE_SITE_DIR") or DEFAULT_OUT / "site")


def expand(cmd: Cmd, out: Path, python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of a registry command line."""
    words = shlex.split(cmd.line.replace("{out}", str(out)).replace("{peers}", str(peers_dir())))
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    program, rest = words[0], words[1:]
    prefix = {"flexserve": [python, "-m", "flexserve.cli"], "python": [python],
              "torchrun": [python, "-m", "torch.distributed.run"],
              "pytest": [python, "-m", "pytest", "-p", "no:cacheprovider"]}
    if program not in prefix:
        raise BenchError(f"{cmd.line!r}: a command starts with one of {', '.join(prefix)}")
    return prefix[program] + rest, env


def peer_scripts(entry: Entry) -> list[Path]:
    """The peer scripts (outside the repository) that the entry's commands run."""
    named = [w for cmd in entry.commands() for w in shlex.split(cmd.line) if "{peers}" in w]
    return [Path(w.replace("{peers}", str(peers_dir()))) for w in dict.fromkeys(named)]


def clean_output(raw: bytes) -> list[str]:
    """A command's output as lines, without progress bars (carriage-return redraws, tqdm lines)."""
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    return [ln for ln in text.split("\n") if not PROGRESS_LINE.search(ln) and not (ln and ln.isspace())]


def result_lines(lines: list[str]) -> list:
    """The `NAME_RESULT {json}` lines of a command's output, parsed, and FlexGen's own throughput lines."""
    out = []
    for ln in lines:
        m = RESULT_LINE.match(ln)
        if m:
            try:
                out.append({m.group(1): json.loads(m.group(3))})
            except json.JSONDecodeError:
                out.append(ln)
        elif re.search(r"throughput: .* token/s", ln):
            out.append(ln.strip())
    return out


SUMMARY_KEYS = re.compile(r"^(model|policy|scheduler|peer|tp|pp)$|tok_s|jct_(mean|p99)|ttft_mean|error|fraction")


def summary(result) -> str:
    """One short line of a result: its name and headline figures (the log keeps the whole line)."""
    if not isinstance(result, dict):
        return result[:200]
    (name, fields), = result.items()
    figures = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
               if SUMMARY_KEYS.search(k) and v is not None and not isinstance(v, (list, dict))]
    return f"{name}: {' '.join(figures) or json.dumps(fields)}"[:400]


# --- the machine --------------------------------------------------------------------------------------------------
def gpu_count() -> int:
    """GPUs this process may use: nvidia-smi's list, cut to CUDA_VISIBLE_DEVICES when that is set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(ln.startswith("GPU ") for ln in listed.splitlines())
    return min(count, len([v for v in visible.split(",") if v.strip()])) if visible else count


def mem_available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib / 2**20


def _capture(argv: list[str], env: dict | None = None) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.SubprocessError) as e:
        return f"({argv[0]}: {e})\n"
    return done.stdout + done.stderr


def git_commit() -> str:
    if not shutil.which("git") or not (REPO / ".git").exists():
        return "? (no git checkout)"
    return _capture(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()


def install_wheels(python: str) -> tuple[str, str]:
    """Install the wheels of wheels_dir() into site_dir(), once per set of wheels: (the folder to put on
    PYTHONPATH or '', what went wrong or ''). A failure is not fatal: entries that need a missing package are
    refused by name before anything runs (missing_modules)."""
    wheels = sorted(wheels_dir().glob("*.whl"))
    if not wheels:
        return "", ""
    site = site_dir()
    stamp = hashlib.md5("\n".join(w.name for w in wheels).encode()).hexdigest()
    stamp_file = site / ".wheels"
    if not (stamp_file.exists() and stamp_file.read_text().strip() == stamp):
        done = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            return "", (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        stamp_file.write_text(stamp + "\n")
    return str(site), ""


@dataclass
class Machine:
    """The environment every entry runs in, and what the runner learnt of the machine."""

    env: dict
    gpus: int
    mem_available_gib: float | None
    facts: str = ""
    python: str = sys.executable
    missing: dict = field(default_factory=dict)  # wheel -> module that does not import


def setup_environment(out: Path, python: str = sys.executable, wheels: bool = True) -> Machine:
    """One environment for every entry of a run (what each device call needs before its first command)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    site, problem = install_wheels(python) if wheels else ("", "")
    if site:
        env["PYTHONPATH"] += os.pathsep + site
    if problem:
        print(f"wheels of {wheels_dir()} not installed: {problem}")
    gpus, mem = gpu_count(), mem_available_gib()
    versions = "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, " \
               "'cuda', torch.version.cuda)"
    facts = [f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"commit: {git_commit()}",
             _capture([python, "-c", versions], env).strip(), f"GPUs visible: {gpus}"]
    if shutil.which("nvidia-smi"):
        facts.append(_capture(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                               "--format=csv,noheader"]).rstrip())
    facts.append(f"MemAvailable: {mem:.0f} GiB" if mem is not None else "MemAvailable: ?")
    if shutil.which("lscpu"):
        facts.append(_capture(["lscpu", "-e=CPU,CORE,SOCKET,NODE"]).rstrip())
    if shutil.which("free"):
        facts.append(_capture(["free", "-g"]).rstrip())
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.txt").write_text("\n".join(facts) + "\n")
    return Machine(env=env, gpus=gpus, mem_available_gib=mem, facts="\n".join(facts[:5]), python=python)


def missing_modules(wheels: set[str], machine: Machine) -> dict[str, str]:
    """The wheels (requirement -> module) whose module does not import in the run's environment."""
    modules = {w: re.split(r"[=<>!~ ]", w)[0].replace("-", "_").lower() for w in wheels}
    if not modules:
        return {}
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    absent = set(_capture([machine.python, "-c", probe, *modules.values()], machine.env).split())
    return {w: m for w, m in modules.items() if m in absent}


def check_machine(entries: list[Entry], gpus: int) -> None:
    """Refuse entries that need more GPUs than the machine has, or peer scripts that are not there."""
    problems = []
    for e in entries:
        if MACHINES[e.machine] > gpus:
            problems.append(f"{e.name} needs {e.machine} (this machine has {gpus}): run it on a GPU machine")
        problems += [f"{e.name} needs the peer script {p}: copy it into .peers/ or set FLEXSERVE_PEERS_DIR"
                     for p in peer_scripts(e) if not p.exists()]
    if problems:
        raise BenchError("\n".join(problems))


def choose(entry: Entry, mem_available_gib: float | None) -> Entry:
    """The entry itself, or its fallback when the host has less free memory than it needs."""
    if entry.host_gib and entry.fallback and mem_available_gib is not None and mem_available_gib < entry.host_gib:
        return BY_NAME[entry.fallback]
    return entry


# --- running ------------------------------------------------------------------------------------------------------
def _stop(proc: subprocess.Popen) -> None:
    """End a command this runner started, with everything it started (its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(cmds: tuple[Cmd, ...], out: Path, machine: Machine, name: str) -> list[dict]:
    """Start the commands of one step at once, wait for each (its own timeout), and return their records."""
    running = []
    for i, cmd in enumerate(cmds):
        argv, extra = expand(cmd, out, machine.python)
        env = {**machine.env, **extra}
        if cmd.gpu is not None:  # the n-th GPU this process may use
            ids = [v for v in machine.env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            env["CUDA_VISIBLE_DEVICES"] = ids[cmd.gpu] if cmd.gpu < len(ids) else str(cmd.gpu)
        raw = out / f".{name}.{i}.raw"
        with open(raw, "wb") as sink:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        running.append((cmd, proc, raw, time.monotonic()))
    records = []
    for cmd, proc, raw, t0 in running:
        try:
            rc = proc.wait(max(0.0, t0 + cmd.timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = 124
        lines = clean_output(raw.read_bytes())
        raw.unlink()
        records.append(dict(entry=name, command=cmd.line, gpu=cmd.gpu, rc=rc, timed_out=rc == 124,
                            seconds=round(time.monotonic() - t0, 1), results=result_lines(lines), output=lines))
    return records


def run_entry(entry: Entry, out: Path, machine: Machine) -> bool:
    """Run one entry's steps in order; write its log and its result records. True when every command passed."""
    log_path = out / f"{entry.name}.log"
    ok = True
    with open(log_path, "w") as log, open(out / "results.jsonl", "a") as results:
        log.write(f"# {entry.name}: {entry.question}\n# {machine.facts.replace(chr(10), chr(10) + '# ')}\n")
        for step in entry.steps:
            cmds = step if isinstance(step, tuple) else (step,)
            for rec in run_step(cmds, out, machine, entry.name):
                gpu = f"[GPU {rec['gpu']}] " if rec["gpu"] is not None else ""
                status = f"timed out after {rec['seconds']:.0f} s" if rec["timed_out"] else \
                    f"{rec['seconds']:.0f} s, exit {rec['rc']}"
                log.write(f"=== {gpu}{rec['command']}\n" + "".join(ln + "\n" for ln in rec["output"] if ln)
                          + f"--- {status}\n")
                log.flush()
                results.write(json.dumps({k: v for k, v in rec.items() if k != "output"}) + "\n")
                print(f"  {gpu}{rec['command'][:100]}  ({status})")
                for r in rec["results"]:
                    print("    " + summary(r))
                if rec["rc"] != 0:
                    ok = False
                    print("".join(f"    | {ln}\n" for ln in rec["output"][-12:] if ln), end="")
    return ok


def cmd_run(names: list[str], out: Path, wheels: bool = True) -> int:
    entries = resolve(names)
    check_machine(entries, gpu_count())
    out = out.resolve()
    machine = setup_environment(out, wheels=wheels)
    print(machine.facts)
    wheels = {w for e in entries for w in e.wheels}
    missing = missing_modules(wheels, machine)
    if missing:
        needers = sorted(e.name for e in entries if set(e.wheels) & set(missing))
        raise BenchError(f"{', '.join(needers)} need(s) {', '.join(missing)}: put the wheels in {wheels_dir()} "
                         "(or FLEXSERVE_WHEELS_DIR)")
    failed = []
    for entry in entries:
        chosen = choose(entry, machine.mem_available_gib)
        if chosen is not entry:
            print(f"{entry.name} needs {entry.host_gib} GiB of free host memory, this host has "
                  f"{machine.mem_available_gib:.0f}: running {chosen.name} instead")
        print(f"== {chosen.name} (~{chosen.seconds} s): {chosen.question}")
        t0 = time.monotonic()
        if not run_entry(chosen, out, machine):
            failed.append(chosen.name)
        print(f"== {chosen.name}: {time.monotonic() - t0:.0f} s, log {out / (chosen.name + '.log')}")
    if failed:
        print(f"failed: {' '.join(failed)}")
    return 1 if failed else 0


# --- packing ------------------------------------------------------------------------------------------------------
@dataclass
class Call:
    machine: str
    seconds: int
    entries: list = field(default_factory=list)


def pack(entries: list[Entry], budget_s: int, setup_s: int = SETUP_S) -> list[Call]:
    """Group entries into device calls of one machine kind each, whose estimate (setup once, then the entries
    one after another) fits budget_s: first fit, longest entry first. An entry longer than the budget alone
    gets a call of its own (over budget). Within a call the entries keep the order they were given in."""
    order = {e.name: i for i, e in enumerate(entries)}
    calls: list[Call] = []
    for e in sorted(entries, key=lambda e: -e.seconds):
        call = next((c for c in calls if c.machine == e.machine and c.seconds + e.seconds <= budget_s), None)
        if call is None:
            call = Call(e.machine, setup_s)
            calls.append(call)
        call.entries.append(e)
        call.seconds += e.seconds
    for c in calls:
        c.entries.sort(key=lambda e: order[e.name])
    kinds = list(MACHINES)[::-1]  # the largest machines first
    return sorted(calls, key=lambda c: (kinds.index(c.machine), order[c.entries[0].name]))


def cmd_pack(names: list[str], budget_s: int, setup_s: int) -> int:
    entries = resolve(names) if names else ENTRIES
    calls = pack(entries, budget_s, setup_s)
    for i, c in enumerate(calls, 1):
        where = "no GPU: any machine, this one too" if c.machine == "cpu" else c.machine
        print(f"call {i} ({where}): ~{c.seconds} s of {budget_s} (setup {setup_s} s + "
              + " + ".join(f"{e.name} {e.seconds}" for e in c.entries) + ")")
        out = "" if c.machine == "cpu" else " --out $OUT"
        print(f"  python3 bench/run.py run {' '.join(e.name for e in c.entries)}{out}")
    for c in calls:
        if c.seconds > budget_s:
            print(f"over budget: {c.entries[0].name} alone needs ~{c.seconds} s (with setup), more than "
                  f"{budget_s}: it has a call of its own; split it or give the call more time")
    return 0


# --- list and show ------------------------------------------------------------------------------------------------
def cmd_list() -> int:
    width = max(len(e.name) for e in ENTRIES)
    for e in ENTRIES:
        print(f"{e.name:{width}}  {e.machine:6}  {e.seconds:4d} s  {e.question}")
    return 0


def cmd_show(names: list[str]) -> int:
    for e in resolve(names):
        print(f"{e.name}: {e.question}")
        print(f"  machine: {e.machine}; estimated {e.seconds} s")
        if e.peer:
            print(f"  peer: {e.peer.replace('{peers}', str(peers_dir()))}")
        if e.wheels:
            print(f"  wheels: {' '.join(e.wheels)} (from {wheels_dir()})")
        if e.host_gib:
            print(f"  host memory: {e.host_gib} GiB free, else {e.fallback} runs instead")
        print(f"  writes: OUT/{e.name}.log" + "".join(f", OUT/{w}" for w in e.writes))
        print("  commands (OUT: --out; flexserve = python -m flexserve.cli, torchrun = python -m "
              "torch.distributed.run):")
        for i, step in enumerate(e.steps, 1):
            cmds = step if isinstance(step, tuple) else (step,)
            for j, c in enumerate(cmds):
                lead = f"  {i}." if j == 0 else "    "
                together = ", at the same time" if len(cmds) > 1 else ""
                gpu = f" [GPU {c.gpu}]" if c.gpu is not None else ""
                print(f"  {lead}{gpu} {c.line.replace('{out}', 'OUT')}   (timeout {c.timeout_s} s{together})")
        if e.note:
            print(f"  note: {e.note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("list", help="every entry: machine, estimated seconds, question")
    s = sub.add_parser("show", help="an entry's commands, machine, wheels, peer and files")
    s.add_argument("entries", nargs="+")
    r = sub.add_parser("run", help="run entries in turn, one log each")
    r.add_argument("entries", nargs="+")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the logs (default bench/out)")
    r.add_argument("--no-wheels", dest="wheels", action="store_false",
                   help="use the interpreter's packages as they are; install nothing from the wheels folder")
    k = sub.add_parser("pack", help="group entries (default: all) into device calls that fit --budget-s each")
    k.add_argument("entries", nargs="*")
    k.add_argument("--budget-s", type=int, default=540, help="seconds one call may take (default 540)")
    k.add_argument("--setup-s", type=int, default=SETUP_S, help=f"seconds a call spends on setup ({SETUP_S})")
    args = p.parse_args(argv)
    try:
        if args.verb == "list":
            return cmd_list()
        if args.verb == "show":
            return cmd_show(args.entries)
        if args.verb == "pack":
            return cmd_pack(args.entries, args.budget_s, args.setup_s)
        return cmd_run(args.entries, args.out, args.wheels)
    except BenchError as e:
        print(f"bench/run.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

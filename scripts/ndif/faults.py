"""Fault suite for the self-hosted NDIF stack: each fault injected, the outcome checked and timed.

    # inside the stack's loopback-only namespace, with the stack running (ci.sh does this):
    python scripts/ndif/faults.py --out /tmp/hvlm-ndif/faults.json

Faults, in order (each bounded; the whole run stops itself after --budget seconds):
  oversized request, malformed request, poll of an unknown job id, a long job with short ones behind
  it, model actor killed (idle, and in flight), Redis restarted, and the whole stack restarted with a
  pending non-blocking job and a finished one. Results are written after each check (atomically) and
  printed as a Markdown table; exit status 1 if any check failed.

Needs the client venv (hooked-vlm + nnsight); uses ``scripts/ndif/{env,start,stop}.sh`` for restarts.
Refuses to run outside a network namespace that has only ``lo``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "ndif"))
from loadtest import loopback_only, configure_client, toy_case  # noqa: E402

ENV_SH = ROOT / "scripts" / "ndif" / "env.sh"


def stack_shell(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` in bash with env.sh sourced (the stack's ports, secrets and state folder)."""
    return subprocess.run(["bash", "-c", f"source {ENV_SH}; {command}"], capture_output=True, text=True, timeout=timeout)


def state_dir() -> Path:
    return Path(os.environ.get("HOOKED_VLM_NDIF_STATE", "/tmp/hvlm-ndif"))


def http(method: str, path: str, timeout: float = 10, **kwargs):
    import httpx
    from nnsight import CONFIG

    headers = {"ndif-api-key": CONFIG.API.APIKEY} if CONFIG.API.APIKEY else {}
    return httpx.request(method, f"{CONFIG.API.HOST}{path}", headers=headers, timeout=timeout, **kwargs)


def wait_connected(limit_s: float) -> float | None:
    """Seconds until /connected answers 200, or None after ``limit_s``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        try:
            if http("GET", "/connected", timeout=3).status_code == 200:
                return time.perf_counter() - t0
        except Exception:
            pass
        time.sleep(0.5)
    return None


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]


def model_actor_pids() -> list[int]:
    """PIDs of our CPU model actor processes (Ray titles them ``ray::_CPUModelDeployment...``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"CPUModelDeployment" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


class Suite:
    """Runs checks, records one row each (written atomically after every check)."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.rows, self.deadline = out, [], time.time() + budget_s
        self.model, self.ids = None, None

    def record(self, fault: str, expected: str, observed: str, seconds: float | None, ok: bool) -> None:
        row = dict(fault=fault, expected=expected, observed=observed, seconds=None if seconds is None else round(seconds, 1), ok=ok)
        self.rows.append(row)
        print(f"[ndif-faults] {'ok  ' if ok else 'FAIL'} {fault}: {observed} ({row['seconds']} s)", flush=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1))
        os.replace(tmp, self.out)

    def run(self, check) -> None:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        if time.time() > self.deadline:
            self.record(name, "-", "not run: the suite's time budget was spent", None, False)
            return
        try:
            check(self)
        except Exception as error:  # a crashed check is a failed row, and the suite goes on
            self.record(name, "-", f"check crashed: {first_line(error)}", None, False)

    def trace(self, ids=None, sleep_s: float = 0.0):
        """One remote trace of the toy model; returns the logits."""
        model, ids = self.model, self.ids if ids is None else ids
        with model.trace(input_ids=ids, remote=True):
            if sleep_s:
                time.sleep(sleep_s)
            logits = model.output.save()
        return logits

    def bounded_trace(self, limit_s: float = 60.0):
        """A remote trace submitted non-blocking and polled for at most ``limit_s`` (a lost job cannot hang the suite)."""
        result = poll(submit(self), limit_s)
        if result is None:
            raise TimeoutError(f"no answer in {limit_s:.0f} s (job lost?)")
        return result

    def local(self, ids=None):
        with self.model.trace(input_ids=self.ids if ids is None else ids):
            logits = self.model.output.save()
        return logits


def submit(s: "Suite", sleep_s: float = 0.0):
    """A non-blocking remote trace of the toy model (returns at once); poll it with :func:`poll`."""
    from nnsight.intervention.backends.remote import RemoteBackend

    backend = RemoteBackend(s.model.to_model_key(), blocking=False)
    with s.model.trace(input_ids=s.ids, backend=backend):
        if sleep_s:
            time.sleep(sleep_s)
        logits = s.model.output.save()  # noqa: F841  (saved under this name)
    return backend


def poll(backend, limit_s: float):
    """The saved logits of a submitted job, or None after ``limit_s``; raises the job's error."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        result = backend()
        if result is not None:
            return next(iter(result.values()))
        time.sleep(0.25)
    return None


def served_within(s: "Suite", limit_s: float) -> tuple[bool, int]:
    """Retry bounded traces until one is served equal to local (within ``limit_s``); returns (served, failed tries)."""
    t0, failures = time.perf_counter(), 0
    while time.perf_counter() - t0 < limit_s:
        try:
            if torch.equal(s.bounded_trace(max(5.0, limit_s - (time.perf_counter() - t0))), s.local()):
                return True, failures
        except Exception:
            pass
        failures += 1
        time.sleep(1.0)
    return False, failures


# ----- checks --------------------------------------------------------------------------------------------------


def check_oversized_request(s: Suite) -> None:
    from nnsight.intervention.backends.remote import RemoteError

    cap = float(os.environ.get("HOOKED_VLM_NDIF_MAX_REQUEST_MB", "512"))
    big = torch.rand(int((cap + 8) * 2**20 // 4), generator=torch.Generator().manual_seed(0))  # incompressible (zstd)
    t0 = time.perf_counter()
    try:
        with s.model.trace(input_ids=s.ids, remote=True):
            s.model.blocks[0].hook_resid_post.output[:] += big[:1].sum()
            s.model.output.save()
        s.record("oversized request", "refused, size and limit stated", "accepted", time.perf_counter() - t0, False)
    except RemoteError as error:
        text = str(error)
        s.record("oversized request", "refused, size and limit stated", text[:150], time.perf_counter() - t0,
                 "over this server's limit" in text)


def check_malformed_request(s: Suite) -> None:
    from nnsight.schema.request import RequestModel

    t0 = time.perf_counter()
    missing = http("POST", "/request", data={"data": RequestModel(model_key=s.model.to_model_key()).metadata()})
    garbage = http("POST", "/request", data={"data": RequestModel(model_key=s.model.to_model_key()).metadata()},
                   files={"blob": ("request", b"\x00not a serialized trace", "application/octet-stream")})
    observed = f"no blob: HTTP {missing.status_code}"
    ok = missing.status_code == 422
    if garbage.status_code == 200:
        job = garbage.json()["id"]
        final = None
        while time.perf_counter() - t0 < 60 and final is None:
            body = http("GET", f"/response/{job}").json() if http("GET", f"/response/{job}").status_code == 200 else {}
            if body.get("status") in ("ERROR", "COMPLETED"):
                final = body
            else:
                time.sleep(0.5)
        observed += f"; garbage blob: {final['status']}: {final['description'].splitlines()[0][:90]}" if final else "; garbage blob: no answer in 60 s"
        ok = ok and final is not None and final["status"] == "ERROR"
    else:
        observed += f"; garbage blob: HTTP {garbage.status_code}"
        ok = ok and 400 <= garbage.status_code < 500
    s.record("malformed request", "clear 4xx or ERROR, server unharmed", observed, time.perf_counter() - t0, ok and torch.equal(s.trace(), s.local()))


def check_unknown_job_id(s: Suite) -> None:
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

    backend = RemoteBackend(s.model.to_model_key(), blocking=False)
    backend.job_id = "feedfacefeedfacefeedfacefeedface"
    t0 = time.perf_counter()
    try:
        result = backend()
        s.record("poll of an unknown job id", "clear error at once", f"returned {result!r}", time.perf_counter() - t0, False)
    except RemoteError as error:
        s.record("poll of an unknown job id", "clear error at once", str(error)[:110], time.perf_counter() - t0,
                 str(error).startswith("unknown job id"))


def check_long_job_and_short_jobs(s: Suite) -> None:
    limit = float(os.environ.get("NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS", "300"))
    long_s = min(12.0, limit - 3)
    baseline = []
    for _ in range(3):
        t0 = time.perf_counter()
        s.trace()
        baseline.append(time.perf_counter() - t0)
    t_long = time.perf_counter()
    long_job = submit(s, sleep_s=long_s)
    time.sleep(1.0)
    short, ok = [], True
    t_short = time.perf_counter()
    for _ in range(3):
        t0 = time.perf_counter()
        ok = ok and torch.equal(s.trace(), s.local())
        short.append(time.perf_counter() - t0)
    long_result = poll(long_job, limit + 30)
    long_total = time.perf_counter() - t_long
    observed = (f"{long_s:.0f} s job; 3 short jobs submitted 1 s later took {', '.join(f'{x:.1f}' for x in short)} s "
                f"(alone: {sorted(baseline)[1]:.2f} s); long job done after {long_total:.1f} s")
    s.record("long job with short jobs behind it", "first short job done before the long one",
             observed, time.perf_counter() - t_short, ok and long_result is not None and 1.0 + short[0] < long_total)


def check_model_actor_killed(s: Suite) -> None:
    s.bounded_trace()  # deployed and idle
    pids = model_actor_pids()
    if not pids:
        s.record("model actor killed (idle)", "next trace served", "no model actor process found", None, False)
        return
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    outcomes, served = [], None
    while time.perf_counter() - t0 < 90 and served is None:
        try:
            served = torch.equal(s.bounded_trace(), s.local())
        except Exception as error:
            outcomes.append(first_line(error))
            time.sleep(1.0)
    observed = (f"killed {len(pids)}; served after {len(outcomes)} failed tries" if served
                else "not served in 90 s") + (f" (first: {outcomes[0][:80]})" if outcomes else "")
    s.record("model actor killed (idle)", "next trace served, or a clear retryable error", observed,
             time.perf_counter() - t0, bool(served))

    # In flight: kill while a 6 s job runs.
    t0 = time.perf_counter()
    job = submit(s, sleep_s=6)
    time.sleep(3.0)
    killed = model_actor_pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    try:
        result = poll(job, 120)
        outcome = "re-run, equal to local" if result is not None and torch.equal(result, s.local()) else "no answer in 120 s"
    except Exception as error:
        outcome = f"failed with: {first_line(error)}"
    after, tries = served_within(s, 90)
    s.record("model actor killed (in flight)", "re-queued, or a clear error; next trace served",
             f"killed {len(killed)}; the job {outcome}; next trace {f'served after {tries} failed tries' if after else 'not served in 90 s'}",
             time.perf_counter() - t0, after and not outcome.startswith("no answer"))


def check_redis_restart(s: Suite) -> None:
    healthy, _ = served_within(s, 90)  # start from a serving stack (earlier checks killed actors)
    logs = state_dir() / "logs"
    size0 = sum(p.stat().st_size for p in logs.glob("*.log"))
    pid = int((state_dir() / "pids" / "redis").read_text())
    os.kill(pid, signal.SIGTERM)
    down_s = 10.0
    time.sleep(down_s)
    during = http("GET", "/connected").status_code
    grown = sum(p.stat().st_size for p in logs.glob("*.log")) - size0
    restarted = stack_shell("ndif_start_redis")
    t0 = time.perf_counter()
    back = wait_connected(60)
    served_after, failures = None, []
    while back is not None and served_after is None and time.perf_counter() - t0 < 30:
        try:
            if torch.equal(s.bounded_trace(), s.local()):
                served_after = time.perf_counter() - t0
        except Exception as error:
            failures.append(first_line(error))
            time.sleep(1.0)
    observed = f"down {down_s:.0f} s: /connected {during}, logs +{grown / 1024:.0f} KiB; "
    observed += (f"/connected after {back:.1f} s" if back is not None else f"API not back in 60 s (redis rc {restarted.returncode})")
    observed += (f"; trace served after {served_after:.1f} s" if served_after is not None else "; no trace served in 30 s")
    observed += f" ({len(failures)} failed tries{': ' + failures[0][:70] if failures else ''})"
    s.record("Redis restarted", "API serves again within 30 s; logs bounded", observed, time.perf_counter() - t0,
             healthy and served_after is not None and served_after < 30 and grown < 2 * 2**20)


def check_stack_restart_with_jobs(s: Suite) -> None:
    done = submit(s)
    finished = poll(done, 60)
    pending = submit(s, sleep_s=8)  # still running (or queued) when the stack stops
    time.sleep(1.0)
    t0 = time.perf_counter()
    stop = stack_shell(f"bash {ROOT}/scripts/ndif/stop.sh", timeout=180)
    start = stack_shell(f"HOOKED_VLM_NDIF_FRESH=0 bash {ROOT}/scripts/ndif/start.sh", timeout=420)
    restart_s = time.perf_counter() - t0
    if start.returncode != 0:
        s.record("stack restarted with jobs", "finished and pending results survive", f"start.sh failed: {start.stderr[-200:]}",
                 restart_s, False)
        return
    local = s.local()
    outcome = {}
    for name, backend, limit in (("finished", done, 60), ("pending", pending, 150)):
        try:
            result = poll(backend, limit)
            outcome[name] = "equal to local" if result is not None and torch.equal(result, local) else f"no result in {limit} s"
        except Exception as error:
            outcome[name] = f"error: {first_line(error)}"
    observed = (f"restart {restart_s:.0f} s (stop rc {stop.returncode}); finished job re-read: {outcome['finished']}; "
                f"pending job: {outcome['pending']}")
    s.record("stack restarted with jobs", "finished and pending results survive", observed, time.perf_counter() - t0,
             finished is not None and outcome["finished"] == outcome["pending"] == "equal to local")


CHECKS = [check_oversized_request, check_malformed_request, check_unknown_job_id, check_long_job_and_short_jobs,
          check_model_actor_killed, check_redis_restart, check_stack_restart_with_jobs]


def markdown(rows: list[dict]) -> str:
    lines = ["| fault | expected | observed | s | ok |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fault']} | {r['expected']} | {r['observed'].replace('|', '/')} | {r['seconds']} | {'yes' if r['ok'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=state_dir() / "faults.json", help="JSON results, rewritten after each check")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which remaining checks are not run")
    parser.add_argument("--only", nargs="*", help="run only these checks (names as in the table, underscores)")
    args = parser.parse_args(argv)
    if not loopback_only():
        print("faults.py runs only inside the stack's loopback-only network namespace (see scripts/ndif/README.md)", file=sys.stderr)
        return 2
    configure_client()
    from hooked_vlm.nnsight_ext import toy_nnsight

    suite = Suite(args.out, args.budget)

    def give_up() -> None:  # hard bound: whatever hangs, the suite ends by itself
        print(markdown(suite.rows), flush=True)
        print(f"[ndif-faults] FAIL: the suite passed its hard limit ({args.budget + 720:.0f} s); stopping", flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.budget + 720, give_up)
    watchdog.daemon = True
    watchdog.start()
    suite.model, suite.ids = toy_nnsight(seed=0), toy_case()
    for check in CHECKS:
        if not args.only or check.__name__.removeprefix("check_") in args.only:
            suite.run(check)
    print(markdown(suite.rows), flush=True)
    failed = [r["fault"] for r in suite.rows if not r["ok"]]
    print(f"[ndif-faults] {len(suite.rows) - len(failed)}/{len(suite.rows)} checks ok" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

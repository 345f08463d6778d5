"""Where a command's CPU goes: every process on the machine, by role (Ray Train's per-fit actors,
the Ray cluster's daemons, sweep drivers, MLflow servers, pytest, ...).

    python bench/cpu_by_process.py -- python -m pytest -q -n 2 --dist loadgroup -m "not alone"
    python bench/cpu_by_process.py --json cpu.json -- python pipeline/sweep.py --config synthetic_tiny

Linux only: it reads /proc every `--interval` seconds while the command runs and counts each
process's user + system time from its first sighting (processes alive before the command started
count only what they used after). A process that lives shorter than one interval is missed, so the
total is a lower bound; the machine's own busy time (/proc/stat) is printed beside it. Run it on a
quiet machine: every process is counted, not only the command's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")

# Ray names an actor's process "ray::ClassName" (its comm is cut to 15 characters).
RAY_ACTORS = {
    "TrainController": "Ray Train: controller (per fit)",
    "PlacementGroupCleaner": "Ray Train: placement-group cleaner (per fit)",
    "DatasetManager": "Ray Train: dataset manager (per fit)",
    "SynchronizationActor": "Ray Train: synchronization actor (per fit)",
    "_QueueActor": "Ray Tune: report queue actor (per fit)",
    "ImplicitFunc": "Ray Tune: trial process (the trainable)",
    "RayTrainWorker": "Ray Train: worker (imports, training)",
    "IDLE": "Ray: idle and task workers",
}
DAEMON_MARKERS = ("ray/dashboard", "ray-dashboard", "log_monitor", "autoscaler/_private/monitor",
                  "ray.util.client.server", "runtime_env/agent", "DashboardAgent", "RuntimeEnvAgent",
                  "_AutoscalerMonitor")


def role(comm: str, cmdline: str) -> str:
    """A process's role, from its name and command line."""
    if cmdline.startswith("ray::") or comm.startswith("ray::"):
        name = cmdline.split()[0][5:] if cmdline.startswith("ray::") else comm[5:]
        for actor, label in RAY_ACTORS.items():
            if name.startswith(actor[:10]):
                return label
        if any(marker in cmdline or marker in comm for marker in DAEMON_MARKERS) or name.startswith(
                ("Dashboard", "RuntimeEnv", "_Autoscal")):
            return "Ray cluster: daemons (GCS, raylet, dashboard, agents)"
        return f"Ray: other actors ({name.split('.')[0]})"
    if comm in ("gcs_server", "raylet") or any(marker in cmdline for marker in DAEMON_MARKERS) or (
            "forkserver" in cmdline and "ray" in cmdline):
        return "Ray cluster: daemons (GCS, raylet, dashboard, agents)"
    if "pipeline/sweep.py" in cmdline or "cpm-sweep" in cmdline:
        return "sweep drivers"
    if ("mlflow" in cmdline and "models serve" in cmdline) or "mlflow.pyfunc" in cmdline:
        return "MLflow model servers"
    if "mlflow" in cmdline and any(word in cmdline for word in ("server", "uvicorn", "gunicorn", "huey")):
        return "MLflow tracking servers"
    if comm.startswith("postgres") or "postgresql" in cmdline:
        return "PostgreSQL"
    if "chrom" in comm or "chrom" in cmdline:
        return "Chromium"
    if re.search(r" -m (pipeline|preprocessing)\b|/cpm-\w+ |/(pipeline|preprocessing)/\w+\.py", cmdline):
        return "project commands run as subprocesses"
    if re.search(r"-m pytest|/pytest |exec\(eval\(sys\.stdin", cmdline):  # pytest and its xdist workers
        return "pytest processes (in-process tests, fixtures)"
    if re.search(r"(/bin/ray |-m ray\b)", cmdline):
        return "ray CLI"
    if "python" in comm or "python" in cmdline:
        return "other Python processes"
    return "other processes"


def machine_busy_s() -> float:
    """CPU-seconds the machine has spent busy since boot (all cores, /proc/stat)."""
    fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICKS


def sample(seen: dict, now: float) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / TICKS
            key = f"{entry}:{fields[19]}"  # pid and start time: a reused pid is another process
            record = seen.get(key)
            if record is None:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
                record = seen[key] = {"cmdline": cmdline[:300], "first_cpu": cpu, "first_seen": now}
            record.update(comm=comm, cpu=cpu)
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples of /proc")
    parser.add_argument("--json", default=None, help="also write the figures (and every process) to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")

    seen: dict[str, dict] = {}
    sample(seen, time.time())
    before = set(seen)  # alive before the command: only what they use from now on counts
    busy_before, started = machine_busy_s(), time.time()
    process = subprocess.Popen(command)
    while process.poll() is None:
        time.sleep(args.interval)
        sample(seen, time.time())
    wall, busy = time.time() - started, machine_busy_s() - busy_before

    by_role: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for key, record in seen.items():
        used = record["cpu"] - record["first_cpu"] if key in before else record["cpu"]
        if used > 0:
            totals = by_role[role(record["comm"], record["cmdline"])]
            totals[0] += 1
            totals[1] += used
    counted = sum(cpu for _, cpu in by_role.values())
    print(f"\n{' '.join(command)[:120]}\nexit {process.returncode}, wall {wall:.0f} s; machine busy "
          f"{busy:.0f} CPU-s ({busy / wall:.2f} cores on average), of which counted by process {counted:.0f}")
    print(f"{'CPU-s':>8} {'share':>6} {'procs':>6}  role")
    for name, (count, cpu) in sorted(by_role.items(), key=lambda item: -item[1][1]):
        print(f"{cpu:8.0f} {100 * cpu / counted:5.1f}% {count:6d}  {name}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "exit": process.returncode, "wall_s": wall, "machine_busy_cpu_s": busy,
                       "by_role": {name: {"processes": n, "cpu_s": cpu} for name, (n, cpu) in by_role.items()},
                       "processes": seen}, handle, indent=1)
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())

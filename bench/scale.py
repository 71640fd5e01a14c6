"""Mission scale on one machine: every stage of the pipeline, as a user runs it, with its memory.

    python bench/scale.py                                               # 1,200,000 / 214,000 / 20,000
    python bench/scale.py --synthetic 120000 --real 21400 --real-test 20000 --s3
    python bench/scale.py --synthetic 12000 --real 2140 --real-test 2000

Eye-sized images, the `tiny` models. The script starts one Ray head (`ray start --head`, its own
temp dir) and runs each stage as a `simgan-dist` command joining it, so that it can watch the
stage from outside: every second, the resident memory of the command (the driver) and of the
largest Ray worker process, and the object store's use. Stages:

  simulate        the corpora, local (with --s3 also into a loopback S3 endpoint, `moto_server`)
  train           2 workers, --iterations adversarial steps, streaming both corpora from storage
                  (a corpus is held in the object store only when it fits a quarter of it)
  refine          the whole synthetic corpus, with the trained checkpoint
  evaluate        `evaluate.max_train_rows` rows, paired by id hash (item 2 of issue 27)
  refine-killed   the refine again into a new folder, SIGKILLed once half its output shards are
                  written, then the same command again: its output must equal the uninterrupted
                  refine's shard for shard, and the rerun says how many rows it refined

Per stage: wall, rows/s, peak RSS of the driver and of the largest worker (RSS counts the
object-store pages a process touched), object-store peak and spilled bytes, output bytes, load
average. One JSON line per stage on stdout, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class Head:
    """A Ray head on this machine with its own temp dir (so no other Ray joins it)."""

    def __init__(self, env: dict[str, str]):
        self.temp_dir = tempfile.mkdtemp(prefix="rayscale-", dir="/tmp")  # short: unix socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = env
        subprocess.run(["ray", "start", "--head", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, text=True)

    def worker_processes(self) -> list[psutil.Process]:
        """The head's Ray worker processes (tasks and actors: the raylet's children that Ray renamed
        `ray::…`), not its own daemons."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if self.temp_dir in cmdline and "raylet" in cmdline.split(" ")[0]:
                for child in proc.children(recursive=True):
                    try:
                        if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::"):
                            found.append(child)
                    except psutil.Error:  # gone, or a zombie, since the listing
                        pass
        return found

    def object_store(self) -> tuple[int, int]:
        """(bytes in use, bytes spilled so far) of the object store, as the raylet reports them."""
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if not hasattr(self, "state"):
            self.state = get_state_from_address(self.address)
        stats = get_memory_info_reply(self.state).store_stats
        return stats.object_store_bytes_used, stats.spilled_bytes_total

    def stop(self) -> None:
        procs = [p for p in psutil.process_iter(["cmdline"])
                 if self.temp_dir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            proc.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Watch:
    """Peaks of a running command and of the head while it runs, sampled every second."""

    def __init__(self, head: Head, proc: subprocess.Popen):
        self.head, self.proc = head, proc
        self.driver_rss = self.worker_rss = self.store_used = 0
        self.spilled_before = head.object_store()[1]
        self.spilled = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        try:
            driver = psutil.Process(self.proc.pid)
            tree = [driver, *driver.children(recursive=True)]
            self.driver_rss = max(self.driver_rss, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        for worker in self.head.worker_processes():
            try:
                self.worker_rss = max(self.worker_rss, worker.memory_info().rss)
            except psutil.Error:
                pass
        used, spilled = self.head.object_store()
        self.store_used = max(self.store_used, used)
        self.spilled = spilled - self.spilled_before

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.sample()

    def stop(self) -> None:
        self.sample()
        self.done.set()
        self.thread.join()


def run_stage(head: Head, name: str, argv: list[str], rows: int | None, output: str | None, env: dict[str, str],
              kill_when: Callable[[], bool] | None = None) -> dict:
    """One `simgan-dist` command under watch; SIGKILLed (a preemption) once `kill_when()` holds.
    `rows`: what the stage goes through (None: not a per-row stage)."""
    load = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(["simgan-dist", *argv], env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, start_new_session=True)
        watch = Watch(head, proc)
        while proc.poll() is None:
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        wall = time.monotonic() - started
        watch.stop()
        log.seek(0)
        out = log.read()
    if kill_when is None and proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{out[-4000:]}")
    row = {"stage": name, "rows": rows, "wall_s": round(wall, 1),
           "rows_per_s": round(rows / wall) if rows else None,
           "driver_peak_rss_mb": round(watch.driver_rss / 2**20), "worker_peak_rss_mb": round(watch.worker_rss / 2**20),
           "object_store_peak_mb": round(watch.store_used / 2**20), "spilled_mb": round(watch.spilled / 2**20),
           "output_mb": round(folder_bytes(output) / 2**20) if output and os.path.isdir(output) else None,
           "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2), "exit": proc.returncode}
    print(json.dumps(row), flush=True)
    row["log"] = out
    return row


def moto_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="bench", aws_secret_access_key="bench").create_bucket(Bucket="scale")
    return server, endpoint


def same_shards(a: str, b: str) -> bool:
    from simgan_dist.data.schema import read_manifest

    return read_manifest(a).shards == read_manifest(b).shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=1_200_000)
    parser.add_argument("--real", type=int, default=214_000)
    parser.add_argument("--real-test", type=int, default=20_000)
    parser.add_argument("--iterations", type=int, default=20, help="adversarial steps of the train stage")
    parser.add_argument("--s3", action="store_true", help="also simulate into a loopback S3 endpoint")
    parser.add_argument("--root", default=None, help="working folder (default: a temp folder, removed)")
    args = parser.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="scale-"))
    data, runs = root / "data", root / "runs"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    head = Head(env)
    env["RAY_ADDRESS"] = head.address
    os.environ.update(RAY_AUTH_MODE="token")  # this process reads the head's object store
    rows = []
    try:
        rows.append(run_stage(head, "simulate", ["simulate", "--out", str(data), "--synthetic", str(args.synthetic),
                                                 "--real", str(args.real), "--real-test", str(args.real_test), *TINY],
                              args.synthetic + args.real + args.real_test, str(data), env))
        if args.s3:
            s3_env = {**env, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                      "AWS_DEFAULT_REGION": "us-east-1"}
            server, s3_env["AWS_ENDPOINT_URL"] = moto_server(s3_env)
            try:
                rows.append(run_stage(head, "simulate (S3)", [
                    "simulate", "--out", "s3://scale/data", "--synthetic", str(args.synthetic), "--real",
                    str(args.real), "--real-test", str(args.real_test), *TINY],
                    args.synthetic + args.real + args.real_test, None, s3_env))
            finally:
                server.terminate()
        train = run_stage(head, "train", [
            "train", *TINY, "--set", f"data.synthetic={data}/synthetic", "--set", f"data.real={data}/real",
            "--set", f"train.storage_path={runs}", "--set", "train.name=scale", "--set", "train.num_workers=2",
            "--set", f"train.iterations={args.iterations}", "--set", "train.checkpoint_every=1000000",
            "--set", "train.image_every=1000000", "--set", "train.report_every=10"],
            None, str(runs), env)
        rate = re.findall(r"\| ([\d,]+) img/s", train["log"])
        train["note"] = f"{args.iterations} adversarial steps" + (f", {rate[-1]} img/s at the end" if rate else "")
        rows.append(train)
        checkpoint = re.search(r"^checkpoint: (\S+)$", train["log"], re.M).group(1)
        refine = ["refine", *TINY, "--checkpoint", checkpoint, "--input", f"{data}/synthetic"]
        first = run_stage(head, "refine", [*refine, "--out", f"{data}/refined"], args.synthetic,
                          f"{data}/refined", env)
        rows.append(first)
        rows.append(run_stage(head, "evaluate", [
            "evaluate", *TINY, "--synthetic", f"{data}/synthetic", "--refined", f"{data}/refined",
            "--real-test", f"{data}/real_test", "--out", str(root / "report")], args.synthetic, str(root / "report"),
            env))
        used = re.search(r"[\d,]+ of [\d,]+ synthetic/refined pairs", (root / "report" / "report.html").read_text())
        rows[-1]["note"] = f"trained on {used.group(0)}" if used else ""
        shards = len(list(Path(data, "refined").glob("part-*.parquet")))
        half_written = lambda: len(list(Path(data, "refined-again").glob("part-*.parquet"))) >= shards / 2  # noqa: E731
        killed = run_stage(head, "refine killed at half", [*refine, "--out", f"{data}/refined-again"],
                           args.synthetic, None, env, kill_when=half_written)
        killed["note"] = f"SIGKILLed once half of its {shards} output shards were written"
        rows.append(killed)
        rerun = run_stage(head, "refine rerun", [*refine, "--out", f"{data}/refined-again"], args.synthetic,
                          f"{data}/refined-again", env)
        done = re.search(r"([\d,]+) of ([\d,]+) rows refined", rerun["log"])
        rerun["note"] = (f"{done.group(0) if done else 'no count printed'}; output "
                         + ("equals" if same_shards(f"{data}/refined", f"{data}/refined-again") else "DIFFERS FROM")
                         + " the uninterrupted refine")
        print(json.dumps({"stage": "refine rerun", "note": rerun["note"]}), flush=True)
        rows.append(rerun)
    finally:
        head.stop()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.synthetic:,} synthetic / {args.real:,} real / {args.real_test:,} real_test rows, "
          f"{os.cpu_count()} CPUs\n")
    print("| stage | rows | wall s | rows/s | driver peak RSS MB | largest worker RSS MB | object store peak MB "
          "| spilled MB | output MB | load start → end | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        rows_, rate, output = (f"{r[k]:,}" if r[k] is not None else "—" for k in ("rows", "rows_per_s", "output_mb"))
        print(f"| {r['stage']} | {rows_} | {r['wall_s']} | {rate} | {r['driver_peak_rss_mb']} | "
              f"{r['worker_peak_rss_mb']} | {r['object_store_peak_mb']} | {r['spilled_mb']} | {output} | "
              f"{r['load_start']} → {r['load_end']} | {r.get('note', '')} |")


if __name__ == "__main__":
    main()

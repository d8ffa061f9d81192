"""SIGKILL trials of checkpoint saves, run as a script (never imported by pytest).

Usage: ``python ckpt_kill_runner.py WORKDIR LINE_TRIALS TIMED_TRIALS SEED``; prints one JSON line
``{"lines": figures, "timed": figures}``. ``skyrl_fn.trainer.checkpoint`` is imported once (torch
too), then each trial forks a child, so a trial costs no interpreter start-up.

Line trials: the child saves steps 1..4 (keep=2) with a line tracer on the checkpoint modules
(``checkpoint`` and ``manifest``) that SIGKILLs it at a seeded random line event (every line of
``save``, ``load`` and the verification is a possible kill point, including between the renames and
in the middle of pruning). The parent then checks what a resume would see: the newest checkpoint
that verifies must exist once a save completed, hold exactly the weights of its step, and be at
most one save behind the last one completed; a further save must succeed and clean up.

Timed trials: the child saves ~2 MB checkpoints (keep=3) in a loop into one directory shared by all
trials, and the parent SIGKILLs it after a seeded random 0.2-1.0 s, so kills land inside file
writes too. The parent then checks the same, and that every visible checkpoint verifies and nothing
but ``step_*`` directories is visible.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import warnings

import torch

torch.set_num_threads(1)
STEPS = 4


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def weights(step: int) -> dict:
    w = torch.arange(4096, dtype=torch.float32).reshape(64, 64) + step
    return {"policy": {"w": w, "tied": w, "step": torch.tensor([float(step)])}}


def saver(ckpt, d: str, kill_at: int | None, out_fd: int) -> None:
    """Child: save steps 1..STEPS, reporting each completed step; SIGKILL at line event kill_at."""
    count = 0
    targets = {ckpt.__file__, sys.modules["skyrl_fn.trainer.manifest"].__file__}

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
            if kill_at is not None and count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename in targets else None

    sys.settrace(tracer)
    for step in range(1, STEPS + 1):
        ckpt.save(d, step=step, weights=weights(step), optim={"policy": {"lr": 0.1}}, config={"step": step}, keep=2)
        os.write(out_fd, f"{step}\n".encode())
    sys.settrace(None)
    os.write(out_fd, f"lines {count}\n".encode())


def run_child(ckpt, d: str, kill_at: int | None) -> tuple[list[int], int | None, bool]:
    """Fork a saver; return (completed steps, its line count if it finished, killed?)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            saver(ckpt, d, kill_at, w)
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    done, lines = [], None
    for line in data.decode().splitlines():
        if line.startswith("lines "):
            lines = int(line.split()[1])
        elif line:
            done.append(int(line))
    return done, lines, killed


def timed_saver(ckpt, d: str, out_fd: int) -> None:
    """Child: save ever newer steps until killed, reporting each completed step."""
    big = torch.randn(512, 1024)  # ~2 MB per save, so kills land mid-write
    os.write(out_fd, b"ready\n")
    step = 1
    while True:
        ckpt.save(d, step=step, weights={"policy": {"w": big + step, "step": torch.tensor([float(step)])}}, keep=3)
        os.write(out_fd, f"{step}\n".encode())
        step += 1


def timed_trials(ckpt, work: str, trials: int, seed: int) -> dict:
    d = os.path.join(work, "timed")
    rng = random.Random(seed)
    fig = {"trials": 0, "killed": 0, "unreadable_latest": 0, "corrupt_loaded": 0, "lost_more_than_one_step": 0,
           "unverified_visible": 0, "stray_visible": 0}
    for _ in range(trials):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                timed_saver(ckpt, d, w)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as out:
            ready = out.readline()
            time.sleep(0.2 + rng.random() * 0.8)
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            done = [int(x) for x in out.read().split()]
        fig["trials"] += 1
        fig["killed"] += ready == b"ready\n" and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)
            c = ckpt.load_latest(d)
        if c is None:
            fig["unreadable_latest"] += bool(done)
            continue
        fig["corrupt_loaded"] += float(c.weights["policy"]["step"][0]) != c.step
        fig["lost_more_than_one_step"] += bool(done) and c.step < done[-1]
        for path in ckpt.list_checkpoints(d):  # every visible checkpoint verifies
            try:
                ckpt.verify(path)
            except Exception:
                fig["unverified_visible"] += 1
        fig["stray_visible"] += sum(not n.startswith("step_") for n in os.listdir(d) if not n.startswith("."))
    return fig


def line_trials(ckpt, work: str, trials: int, seed: int) -> dict:
    # One full run without a kill counts the line events of the whole save sequence.
    probe = os.path.join(work, "probe")
    _, total, _ = run_child(ckpt, probe, None)
    shutil.rmtree(probe)
    rng = random.Random(seed)
    fig = {"trials": 0, "killed": 0, "kill_points": total, "unreadable_latest": 0, "corrupt_loaded": 0,
           "lost_more_than_one_step": 0, "resave_failed": 0, "fallbacks": 0}
    for trial in range(trials):
        d = os.path.join(work, f"t{trial}")
        done, _, killed = run_child(ckpt, d, rng.randint(1, total))
        fig["trials"] += 1
        fig["killed"] += killed
        last_done = done[-1] if done else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                c = ckpt.load_latest(d)
            except ckpt.NoValidCheckpointError:
                c = None
        fig["fallbacks"] += any("skipping" in str(x.message) for x in caught)
        if c is None:
            fig["unreadable_latest"] += last_done > 0
        else:
            ok = float(c.weights["policy"]["step"][0]) == c.step and torch.equal(c.weights["policy"]["w"], weights(c.step)["policy"]["w"])
            fig["corrupt_loaded"] += not ok or c.config != {"step": c.step}
        got = c.step if c is not None else 0
        fig["lost_more_than_one_step"] += got < last_done
        # Saving again recovers: leftovers removed, the new checkpoint verifies.
        try:
            path = ckpt.save(d, step=last_done + 1, weights=weights(last_done + 1), config={"step": last_done + 1}, keep=2)
            ckpt.load(path)
            leftovers = [n for n in os.listdir(d) if n.startswith(".")]
            fig["resave_failed"] += bool(leftovers)
        except Exception:
            fig["resave_failed"] += 1
        shutil.rmtree(d, ignore_errors=True)
    return fig


def main() -> None:
    sys.path.insert(0, REPO)
    from skyrl_fn.trainer import checkpoint as ckpt

    work, lines, timed, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    os.makedirs(work, exist_ok=True)
    figures = {"lines": line_trials(ckpt, work, lines, seed), "timed": timed_trials(ckpt, work, timed, seed)}
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()

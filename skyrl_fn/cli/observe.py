"""Watching a run: a rich progress bar, metrics to JSONL / TensorBoard / wandb, and at the end a
PNG of reward and KL per step plus a one-line summary.

Nothing is left half-written: ``metrics.jsonl`` grows one whole line per ``write`` (flushed),
and ``reward_kl.png`` / ``summary.json`` are written to a temporary file in the same directory,
fsynced, then renamed over the target (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

__all__ = ["RunObserver", "atomic_write", "metric", "first_last_mean", "plot_reward_kl", "summary_line"]

#: Display name -> metric keys tried in order (the learner's names first).
METRIC_KEYS: Mapping[str, tuple[str, ...]] = {
    "reward": ("reward", "reward/mean"),
    "loss": ("loss", "pg_loss"),
    "kl": ("kl", "kl_loss"),
    "tokens_per_s": ("tokens_per_s",),
}


def metric(metrics: Mapping[str, Any], name: str, default: float = math.nan) -> float:
    """The value of the display metric ``name`` (see ``METRIC_KEYS``) as a float, or ``default``."""
    for key in METRIC_KEYS.get(name, (name,)):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return default


def first_last_mean(values: Sequence[float], frac: float = 0.1) -> tuple[float, float]:
    """Means of the first and last ``frac`` of ``values`` (at least one value each)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    k = max(1, int(round(len(vals) * frac)))
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, fsync, then rename it to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot_reward_kl(path: str, rows: Sequence[Mapping[str, Any]], *, title: str = "") -> None:
    """Write a PNG of reward (top) and KL (bottom) per step, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    held = [(int(r["step"]), float(r["eval_accuracy"])) for r in rows if "eval_accuracy" in r]
    rows = [r for r in rows if not math.isnan(metric(r, "reward"))]  # not the step-0 evaluation row
    steps = [int(r["step"]) for r in rows]
    reward = [metric(r, "reward") for r in rows]
    kl = [metric(r, "kl") for r in rows]
    fig, (ax_r, ax_k) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, constrained_layout=True)
    ax_r.plot(steps, reward, color="tab:blue", marker=".", lw=1.2, label="mean reward")
    if len(reward) >= 5:  # a 5-step moving average makes the trend readable
        k = 5
        smooth = [sum(reward[max(0, i - k + 1): i + 1]) / len(reward[max(0, i - k + 1): i + 1]) for i in range(len(reward))]
        ax_r.plot(steps, smooth, color="tab:orange", lw=2, label="5-step average")
    if held:  # held-out greedy pass@1 (--eval.every), on the same 0..1 scale
        ax_r.plot([s for s, _ in held], [a for _, a in held], color="tab:green", marker="o", lw=1.5, label="held-out accuracy (greedy)")
    ax_r.set_ylabel("reward / accuracy" if held else "reward")
    ax_r.grid(alpha=0.3)
    ax_r.legend(loc="lower right")
    if all(math.isnan(v) for v in kl):
        ax_k.text(
            0.5, 0.5, "no reference model in this run\n(KL is logged with --algorithm.use-kl-loss or --algorithm.use-kl-in-reward)",
            ha="center", va="center", transform=ax_k.transAxes, fontsize=9, color="0.35",
        )
        ax_k.set_yticks([])
    else:
        ax_k.plot(steps, kl, color="tab:red", marker=".", lw=1.2)
    ax_k.set_ylabel("KL(policy || reference)")
    ax_k.set_xlabel("step")
    ax_k.grid(alpha=0.3)
    if title:
        ax_r.set_title(title)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    finally:
        plt.close(fig)


def summary_line(rows: Sequence[Mapping[str, Any]], *, seconds: float, run_dir: str) -> str:
    """``done: N steps in S s | reward a -> b (first/last 10%) | eval accuracy c -> d | KL k | T tok/s | run_dir``
    (the eval part with ``--eval.every``: the first and last held-out evaluations)."""
    reward = [metric(r, "reward") for r in rows]
    first, last = first_last_mean(reward)
    kl = metric(rows[-1], "kl") if rows else math.nan
    held = [float(r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    tps = [metric(r, "tokens_per_s") for r in rows]
    tps = [t for t in tps if not math.isnan(t)]
    parts = [
        f"done: {sum(1 for r in rows if int(r['step']) > 0)} steps in {seconds:.1f} s",
        f"reward {first:.3f} -> {last:.3f} (first/last 10%, {last - first:+.3f})",
    ]
    if held:
        parts.append(f"eval accuracy {held[0]:.3f} -> {held[-1]:.3f} ({held[-1] - held[0]:+.3f})")
    if not math.isnan(kl):
        parts.append(f"final KL {kl:.4f}")
    if tps:
        parts.append(f"{sum(tps) / len(tps):.0f} tok/s")
    parts.append(f"outputs in {run_dir}")
    return " | ".join(parts)


class RunObserver:
    """Receives one metrics mapping per step; owns every output of the run directory but the
    checkpoints.

    Use as a context manager; call :meth:`on_step` each step (it is the ``on_step`` callback of
    ``skyrl_fn.trainer.loop.train``) and :meth:`finish` at the end.

    Args:
        run_dir: output directory (``metrics.jsonl``, ``tb/``, ``reward_kl.png``, ``summary.json``).
        total_steps: for the progress bar.
        start_step: the step a resumed run continues after; JSONL rows beyond it are dropped.
        jsonl, tensorboard, plot, progress: which outputs to produce.
        wandb_project: log to wandb too (only if the ``wandb`` extra is installed).
        config: JSON-ready config stored in ``summary.json`` and wandb.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        jsonl: bool = True,
        tensorboard: bool = True,
        plot: bool = True,
        progress: bool = True,
        wandb_project: str | None = None,
        config: Mapping[str, Any] | None = None,
        out=None,
    ) -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.plot = plot
        self.config = dict(config or {})
        self.rows: list[dict[str, Any]] = []
        self.out = out if out is not None else sys.stdout
        self._t0 = time.perf_counter()
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = None
        if jsonl:
            path = os.path.join(run_dir, "metrics.jsonl")
            self._trim_jsonl(path, start_step)
            self._jsonl = open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("warning: logging.wandb_project is set but wandb is not installed "
                      "(pip install 'skyrl_fn[wandb]'); skipping wandb", file=sys.stderr)
            else:
                self._wandb = wandb.init(project=wandb_project, config=self.config, dir=run_dir)
        self._progress = None
        if progress:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("reward {task.fields[reward]}  loss {task.fields[loss]}  KL {task.fields[kl]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(file=self.out), transient=False,
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, reward="-", loss="-", kl="-", tps="-"
            )
            self._progress.start()

    @staticmethod
    def _trim_jsonl(path: str, start_step: int) -> None:
        """On resume keep rows up to ``start_step`` (rows after the checkpoint are redone);
        on a fresh run start an empty file."""
        if not os.path.exists(path):
            return
        keep: list[str] = []
        if start_step > 0:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if int(json.loads(line)["step"]) <= start_step:
                            keep.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from a killed run
        atomic_write(path, lambda f: f.writelines(keep))

    def __enter__(self) -> "RunObserver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def on_step(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record one step's metrics everywhere and advance the bar.

        ``step`` (1-based) defaults to ``metrics["step"]`` (the training loop puts it there).
        """
        if step is None:
            if "step" not in metrics:
                raise ValueError(f"metrics: expected a 'step' entry (or pass step=), got keys {sorted(metrics)}")
            step = int(metrics["step"])
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if key == "step":
                continue
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                continue  # non-numeric extras are not metrics
        row["time_s"] = time.perf_counter() - self._t0
        self.rows.append(row)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        reason = metrics.get("skip_reason")
        if isinstance(reason, str):  # a skipped step (skyrl_fn.trainer.nonfinite): why, with the rows
            self.event("step_skipped", step=row["step"], reason=reason)
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and math.isfinite(value):
                    self._tb.add_scalar(key, value, global_step=row["step"])
        if self._wandb is not None:
            self._wandb.log(row, step=row["step"])
        if self._progress is not None:
            fmt = lambda v, spec: "-" if math.isnan(v) else format(v, spec)  # noqa: E731
            self._progress.update(
                self._task, completed=row["step"],
                reward=fmt(metric(row, "reward"), ".3f"), loss=fmt(metric(row, "loss"), ".4f"),
                kl=fmt(metric(row, "kl"), ".4f"), tps=fmt(metric(row, "tokens_per_s"), ".0f"),
            )

    def event(self, name: str, *, step: int, **fields: Any) -> None:
        """Write one non-metric row ``{"step", "event": name, **fields}`` to ``metrics.jsonl``
        (e.g. the config changes of a resume); not plotted, not counted as a step."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), "event": name, **fields}, default=str) + "\n")
            self._jsonl.flush()

    def finish(self, extra: Mapping[str, Any] | None = None) -> str:
        """Close the live outputs, write the PNG and ``summary.json``; return the summary line."""
        self.close()
        seconds = time.perf_counter() - self._t0
        line = summary_line(self.rows, seconds=seconds, run_dir=self.run_dir)
        if self.plot and self.rows:
            plot_reward_kl(os.path.join(self.run_dir, "reward_kl.png"), self.rows, title="skyrl_fn: mean reward and KL per step")
        first, last = first_last_mean([metric(r, "reward") for r in self.rows])
        summary = {
            "steps": sum(1 for r in self.rows if r["step"] > 0), "seconds": seconds, "reward_first_10pct": first, "reward_last_10pct": last,
            "final": self.rows[-1] if self.rows else {}, "summary": line, "config": self.config, **dict(extra or {}),
        }
        atomic_write(os.path.join(self.run_dir, "summary.json"), lambda f: json.dump(summary, f, indent=2, default=str))
        print(line, file=self.out, flush=True)
        return line

    def close(self) -> None:
        """Stop the bar and close the writers (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

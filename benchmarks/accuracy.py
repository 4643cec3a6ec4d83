"""Accuracy against keep ratio, measured by lmms-eval (the tool users already run) through
``vs-vllm serve``: one server per (strategy, keep ratio), lmms-eval's own OpenAI backend
(``--model openai``) asking it.

For each strategy x keep ratio it starts ``vs-vllm serve MODEL --vision-keep-ratio R
--vision-selector-strategy S`` (with ``--vision-selector`` for ``learned``); keep 1.0 is served
once, without ``--vision-keep-ratio`` (every visual token: the baseline, shared by all
strategies). Against each server it runs, from lmms-eval's own virtual environment
(``scripts/setup-env-lmms.sh`` makes ``.venv-lmms``)::

    .venv-lmms/bin/python -m lmms_eval --model openai \\
        --model_args model_version=<served id>,base_url=<url>/v1,api_key=none,num_concurrent=1 \\
        --tasks TASKS --include_path benchmarks/lmms_tasks --batch_size 1 --log_samples \\
        --output_path <folder> [--limit N]

reads lmms-eval's results JSON and writes one CSV row per strategy x ratio x task x metric,
prints the table and plots each task's metric against keep ratio, one line per strategy (the
form of the paper's figure). lmms-eval scores a request that failed as a wrong answer; here
any failed request (``[LMMS_EVAL_REQUEST_FAILED ...]`` in its samples) is an error instead.

    python benchmarks/accuracy.py        # the bundled demo model (demo/ring/), task vs_demo_ring
    python benchmarks/accuracy.py --model Qwen/Qwen2.5-VL-7B-Instruct --vision-selector S \\
        --tasks mme,textvqa_val --serve-arg=--max-model-len=16384

Without ``--model`` it serves the bundled demo model (``demo/ring/backbone``, its scorer
``demo/ring/scorer``) with the tiny models' CPU settings and asks lmms-eval's local task
``vs_demo_ring`` (``benchmarks/lmms_tasks/``: the demo's 24 held-out images, "What colour is the
ring?", right when the answer starts with the true colour, as ``vs-vllm demo`` scores).
Writes ``<out>/<device>/<name>.csv`` and ``.png`` (``--out`` default ``benchmarks/results``,
``--name`` default ``accuracy``); lmms-eval's own outputs and the server logs stay in a work
folder (printed; ``--work`` sets it).

``--url URL`` evaluates a server you already run instead (one started by hand, or by a test that
asks it too): no server is started, lmms-eval asks URL (the model id its ``/v1/models`` names),
and the run takes exactly one configuration (one strategy and one keep ratio, or ``--ratios
1.0`` for a server without ``--vision-keep-ratio``: a server's flags are fixed). The rows still
record the ``--strategies`` / ``--ratios`` (and ``--model``, ``--vision-selector``) given, which
must be the server's own; the script cannot check them.

    python benchmarks/accuracy.py --url http://127.0.0.1:8000 --strategies learned --ratios 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results_name import file_stem

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "ring"
DEMO_TASK = "vs_demo_ring"
TASKS_DIR = ROOT / "benchmarks" / "lmms_tasks"
LMMS_VENV = ROOT / ".venv-lmms"
FAILED = "[LMMS_EVAL_REQUEST_FAILED"
ALL_TOKENS = "all tokens"  # the strategy column of the keep 1.0 rows
FIELDS = ("strategy", "keep_ratio", "task", "metric", "value", "stderr", "n", "prompt_tokens")
FACTS = ("scorer", "model", "lmms_eval", "device", "date", "command")


@dataclass(frozen=True)
class Config:
    strategy: str  # ALL_TOKENS for keep 1.0
    ratio: float

    @property
    def label(self) -> str:
        return ALL_TOKENS if self.strategy == ALL_TOKENS else f"{self.strategy} keep {self.ratio:g}"

    @property
    def slug(self) -> str:
        return "all" if self.strategy == ALL_TOKENS else f"{self.strategy}_{self.ratio:g}"


def configs(strategies: list[str], ratios: list[float]) -> list[Config]:
    """Keep 1.0 once (every token, whatever the strategy), then strategy x the other ratios."""
    out = [Config(ALL_TOKENS, 1.0)] if any(r == 1.0 for r in ratios) else []
    out += [Config(s, r) for s in strategies for r in ratios if r != 1.0]
    return out


def selection_args(config: Config, scorer: str | None) -> list[str]:
    """The ``vs-vllm serve`` selection flags of one configuration (none for keep 1.0)."""
    if config.strategy == ALL_TOKENS:
        return []
    args = ["--vision-keep-ratio", f"{config.ratio:g}", "--vision-selector-strategy"]
    args.append(config.strategy)
    if config.strategy == "learned" and scorer:
        args += ["--vision-selector", scorer]
    return args


def lmms_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(
            f"accuracy.py: error: lmms-eval's virtual environment is missing ({python} does not "
            f"exist); make it with scripts/setup-env-lmms.sh (or pass --lmms-venv DIR)"
        )
    return python


def lmms_version(venv: Path) -> str:
    """lmms-eval's installed version (its results JSON names the git commit of the folder it ran
    in instead)."""
    found = sorted(venv.glob("lib/python*/site-packages/lmms_eval-*.dist-info"))
    return found[0].name.removeprefix("lmms_eval-").removesuffix(".dist-info") if found else ""


def served_model_id(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def lmms_command(python: Path, model_id: str, url: str, args: argparse.Namespace, out: Path):
    model_args = ",".join(
        [
            f"model_version={model_id}",
            f"base_url={url}/v1",
            "api_key=none",
            f"num_concurrent={args.num_concurrent}",
        ]
    )
    cmd = [str(python), "-m", "lmms_eval", "--model", "openai", "--model_args", model_args]
    cmd += ["--tasks", args.tasks, "--include_path", str(TASKS_DIR), "--batch_size", "1"]
    cmd += ["--log_samples", "--output_path", str(out)]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    return [*cmd, *args.lmms_arg]


def parse_results(out: Path) -> tuple[dict, list[Path]]:
    """lmms-eval's results JSON (the one run written under ``out``) and its samples files."""
    found = sorted(out.rglob("*_results.json"))
    if len(found) != 1:
        raise RuntimeError(f"expected one lmms-eval results JSON under {out}, found {found}")
    return json.loads(found[0].read_text()), sorted(out.rglob("*_samples_*.jsonl"))


def failed_requests(samples: list[Path]) -> list[str]:
    """Samples whose request failed (lmms-eval scores them as wrong answers)."""
    bad = []
    for path in samples:
        for line in path.read_text().splitlines():
            if FAILED in line:
                doc = json.loads(line)
                bad.append(f"{path.name} doc {doc.get('doc_id')}: {doc.get('filtered_resps')}")
    return bad


def rows_of(results: dict, config: Config) -> list[dict]:
    """One row per task x metric of lmms-eval's results (numbers only; stderr beside them)."""
    n_samples = results.get("n-samples", {})
    usage = results.get("efficiency", {}).get("by_task", {})
    rows = []
    for task, metrics in results["results"].items():
        n = n_samples.get(task, {}).get("effective")
        if n is None:  # a group: its subtasks' samples
            subtasks = results.get("group_subtasks", {}).get(task, [])
            counts = [n_samples.get(t, {}).get("effective") for t in subtasks]
            n = sum(counts) if counts and None not in counts else ""
        eff = usage.get(task, {})
        tokens = eff.get("total_input_tokens")
        prompt = round(tokens / eff["docs"], 1) if tokens and eff.get("docs") else ""
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key == "alias" or "_stderr" in metric or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "strategy": config.strategy,
                    "keep_ratio": config.ratio,
                    "task": task,
                    "metric": metric if filt in ("", "none") else f"{metric},{filt}",
                    "value": value,
                    "stderr": stderr if isinstance(stderr, int | float) else "",
                    "n": n,
                    "prompt_tokens": prompt,
                }
            )
    return rows


def device_name() -> tuple[str, str]:
    """(label, slug) of the device the servers ran on: the first GPU, else the CPU."""
    import torch

    from benchmarks.device_name import device_label, device_slug

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device_label(device), device_slug(device)


def _shown(path: str) -> str:
    """A path as the CSV shows it: relative to the clone when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def _floats(text: str) -> list[float]:
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from err
    if not ratios or not all(0 < r <= 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"keep ratios must lie in (0, 1], got {text!r}")
    return ratios


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("at least one name")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model to serve (default: the bundled demo)")
    p.add_argument(
        "--vision-selector",
        default=None,
        metavar="PATH",
        help="scorer of the learned strategy (default with the bundled demo: demo/ring/scorer; "
        "leave out for a merged VisionSelector checkpoint)",
    )
    p.add_argument("--strategies", type=_names, default=["learned", "random"])
    p.add_argument(
        "--ratios",
        type=_floats,
        default=[1.0, 0.3, 0.1],
        help="keep ratios, comma-separated (default 1.0,0.3,0.1; 1.0 is served once, without "
        "selection)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help=f"lmms-eval tasks, comma-separated (default: {DEMO_TASK}, the bundled demo's "
        "images; benchmarks/lmms_tasks/ is on lmms-eval's include path)",
    )
    p.add_argument("--limit", type=int, default=None, help="lmms-eval --limit (samples per task)")
    p.add_argument("--num-concurrent", type=int, default=1, help="requests in flight (default 1)")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `vs-vllm serve` argument, repeatable (write --serve-arg=--flag=value)",
    )
    p.add_argument(
        "--lmms-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra lmms-eval argument, repeatable (e.g. --lmms-arg=--gen_kwargs=max_new_tokens=8)",
    )
    p.add_argument("--lmms-venv", type=Path, default=LMMS_VENV, help="lmms-eval's environment")
    p.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help="evaluate a server you already run (e.g. http://127.0.0.1:8000) instead of starting "
        "one per configuration; takes one strategy and one keep ratio, which (with --model and "
        "--vision-selector) must match the server's flags: they are recorded, not checked "
        "(--serve-arg and --server-timeout are then unused)",
    )
    p.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for health")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", type=file_stem, default="accuracy", help="file stem of CSV and PNG")
    p.add_argument("--work", type=Path, default=None, help="lmms-eval outputs and server logs")
    args = p.parse_args(argv)
    if args.url is not None:
        args.url = args.url.rstrip("/")
        plan = configs(args.strategies, args.ratios)
        if len(plan) != 1:
            p.error(
                f"--url evaluates one running server, so one strategy and one keep ratio, got "
                f"{len(plan)} configurations ({', '.join(c.label for c in plan)})"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    python = lmms_python(args.lmms_venv)
    # a SIGTERM (a timeout, CI cancelling) still stops the server it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from vs_vllm.local_server import TINY_MODEL_SERVE_ARGS, served, subprocess_env

    command = shlex.join(["python", "benchmarks/accuracy.py", *argv])
    serve_args = list(args.serve_arg)
    if args.model is None:
        model, model_name = DEMO / "backbone", "bundled demo (demo/ring/backbone)"
        scorer = args.vision_selector or str(DEMO / "scorer")
        serve_args = [*TINY_MODEL_SERVE_ARGS, *serve_args]
    else:
        model, model_name, scorer = args.model, args.model, args.vision_selector
    args.tasks = args.tasks or DEMO_TASK
    work = args.work or Path(tempfile.mkdtemp(prefix="vs-vllm-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = configs(args.strategies, args.ratios)
    servers = f"the server at {args.url}" if args.url else f"{len(plan)} servers"
    print(
        f"[accuracy] {model_name}; tasks {args.tasks}; {servers}: "
        + ", ".join(c.label for c in plan)
        + f"; lmms-eval from {args.lmms_venv}; work folder {work}",
        flush=True,
    )
    env = subprocess_env()
    rows: list[dict] = []
    for i, config in enumerate(plan, 1):
        extra = [*serve_args, *selection_args(config, scorer)]
        log = work / f"server_{config.slug}.log"
        if args.url:
            print(
                f"\n[accuracy] ({i}/{len(plan)}) {config.label}: evaluating the server at "
                f"{args.url} (started elsewhere; recorded as serving {model} "
                f"{shlex.join(selection_args(config, scorer))})",
                flush=True,
            )
            server = contextlib.nullcontext(args.url)
        else:
            print(
                f"\n[accuracy] ({i}/{len(plan)}) {config.label}: starting vs-vllm serve {model} "
                f"{shlex.join(extra)} (log {log})",
                flush=True,
            )
            server = served(model, *extra, log=log, timeout=args.server_timeout)
        started = time.perf_counter()
        with server as url:
            if not args.url:
                up = time.perf_counter() - started
                print(f"[accuracy] server up after {up:.0f} s", flush=True)
            try:
                model_id = served_model_id(url)
            except OSError as err:
                raise SystemExit(f"accuracy.py: error: {url}/v1/models: {err}") from err
            if any(s in model_id for s in ("o1", "o3", "o4", "gpt-5")):
                print(
                    f"[accuracy] warning: lmms-eval's openai backend drops temperature for a "
                    f"model id containing o1/o3/o4/gpt-5 ({model_id!r}): answers may be sampled",
                    flush=True,
                )
            out = work / f"lmms_{config.slug}"
            shutil.rmtree(out, ignore_errors=True)  # a reused --work: this run's results only
            cmd = lmms_command(python, model_id, url, args, out)
            lmms_log = work / f"lmms_{config.slug}.log"
            print(f"[accuracy] lmms-eval (log {lmms_log}): {shlex.join(cmd)}", flush=True)
            started = time.perf_counter()
            with lmms_log.open("w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(
                    f"accuracy.py: error: lmms-eval exited {proc.returncode} ({config.label}); "
                    f"the end of {lmms_log}:\n{lmms_log.read_text()[-4000:]}"
                )
        results, samples = parse_results(out)
        bad = failed_requests(samples)
        if bad:
            raise SystemExit(
                f"accuracy.py: error: {len(bad)} request(s) failed ({config.label}; lmms-eval "
                f"would count them wrong):\n" + "\n".join(bad[:10])
            )
        got = rows_of(results, config)
        print(
            f"[accuracy] lmms-eval done in {time.perf_counter() - started:.0f} s: "
            + "; ".join(f"{r['task']} {r['metric']} {r['value']:.4g} (n={r['n']})" for r in got),
            flush=True,
        )
        used = _shown(scorer) if config.strategy == "learned" and scorer else ""
        rows += [{**r, "scorer": used, "lmms_eval": lmms_version(args.lmms_venv)} for r in got]

    label, slug = device_name()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    facts = {"model": str(model_name), "device": label, "date": date}
    facts["command"] = command
    out_dir = args.out / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{args.name}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, *FACTS])
        writer.writeheader()
        writer.writerows({**r, **facts} for r in rows)
    print_table(rows, facts)
    png = csv_path.with_suffix(".png")
    plot(rows, png, f"{model_name}: lmms-eval through vs-vllm serve\n{command}")
    print(f"wrote {csv_path} and {png} (lmms-eval outputs and server logs: {work})")
    return 0


def print_table(rows: list[dict], facts: dict) -> None:
    print(f"\nmodel: {facts['model']}; device: {facts['device']}; {facts['date']}")
    print(f"command: {facts['command']}")
    print(
        f"{'task':<16} {'metric':<22} {'strategy':<11} {'keep':>5} {'value':>9} {'stderr':>8} "
        f"{'n':>6} {'prompt tok':>10}"
    )
    for r in rows:
        stderr = f"{r['stderr']:.4f}" if r["stderr"] != "" else "-"
        print(
            f"{r['task']:<16} {r['metric']:<22} {r['strategy']:<11} {r['keep_ratio']:>5g} "
            f"{r['value']:>9.4g} {stderr:>8} {r['n']!s:>6} {r['prompt_tokens']!s:>10}"
        )


def plot(rows: list[dict], path: Path, title: str) -> None:
    """One panel per task x metric: the metric against keep ratio, a line per strategy (each
    starting from the all-tokens point at keep 1.0, also drawn as a dashed baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["metric"]) for r in rows})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False, layout="constrained"
    )
    for ax, (task, metric) in zip(axes[0], panels, strict=True):
        mine = [r for r in rows if (r["task"], r["metric"]) == (task, metric)]
        full = [r for r in mine if r["strategy"] == ALL_TOKENS]
        for strategy in dict.fromkeys(r["strategy"] for r in mine if r["strategy"] != ALL_TOKENS):
            points = sorted(
                [(r["keep_ratio"], r["value"]) for r in mine if r["strategy"] == strategy]
                + [(r["keep_ratio"], r["value"]) for r in full]
            )
            ax.plot(*zip(*points, strict=True), marker="o", label=strategy)
        if full:
            ax.axhline(full[0]["value"], color="grey", ls="--", lw=1, label=ALL_TOKENS)
        ns = {r["n"] for r in mine}
        ax.set_title(f"{task} (n={'/'.join(str(n) for n in sorted(ns, key=str))})", fontsize=9)
        ax.set_xlabel("keep ratio (visual tokens kept)")
        ax.set_ylabel(metric)
        ratios = sorted({r["keep_ratio"] for r in mine})
        ax.set_xticks(ratios, [f"{x:g}" for x in ratios])
        if all(0 <= r["value"] <= 1 for r in mine):
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

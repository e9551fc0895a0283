"""Every torchvision classifier and a dozen timm architectures, exported, augmented with the
defaults, and compared with pytorch-grad-cam and torch autograd; the results go to docs/ZOO.md.

    python benchmarks/zoo.py [--source torchvision|timm] [--models a,b] [--exporters torchscript]
                             [--timeout 600] [--memory-gb 12] [--rerun] [--report-only]

Each (model, exporter) runs in its own subprocess with a timeout and a memory watchdog, so a
crash or a blow-up is recorded rather than fatal. Results are appended to docs/ZOO.jsonl, one
JSON record per line; a run skips what that file already holds (unless --rerun) and rewrites
docs/ZOO.md after every model, listing what has not been run as such. Models run smallest
first (parameters counted on the meta device).

The comparison itself is tests/zoo_reference.py (shared with tests/test_transformer_zoo.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # zoo_reference and zoo (tests/zoo.py, not this file)

RESULTS = ROOT / "docs" / "ZOO.jsonl"
REPORT = ROOT / "docs" / "ZOO.md"
WORK = Path(tempfile.gettempdir()) / "gradcam_zoo"  # exports kept where the outcome is not a match
EXTRA_OUTCOMES = ("timeout", "crashed")
GOAL_SHARE = 0.95
# Sections other checks write (test_decoders.py's and test_half.py's figures,
# benchmarks/quantized_zoo.py, benchmarks/bench_detection.py), kept on rewrites.
KEPT_SECTIONS = ("## Decoders", "## Half precision", "## Quantized", "## Detection")
# Why a run does not match, found by reading its graph: (source, model, exporter) -> one line.
# Shown with the run's message in docs/ZOO.md; "*" stands for both exporters.
CAUSES: dict[tuple[str, str, str], str] = {
    ("timm", "levit_128s", "torchscript"): (
        "LeViT normalises with BatchNorm, no LayerNorm, so no transformer recipe applies; the CNN "
        "rule then takes the last 4-D tensor flattened on the way to the score, attention's "
        "per-head [N, heads, T, d] transpose in the last block, whose layout is refused. The "
        "candidates listed are the last stage's tokens with their own 4x4 grid (LeViT shrinks "
        "its grid by subsampling tokens in attention, not by a Conv): their count, symbolic in "
        "the graph, is counted with the batch fixed to 1, and the stem's 14x14 grid does not "
        "fit it."
    ),
    ("timm", "levit_128s", "dynamo"): (
        "as with TorchScript: no LayerNorm, so the CNN rule lands on attention's per-head "
        "[N, heads, T, d] transpose, refused; the candidates listed are the last stage's "
        "tokens with the 4x4 grid their count (16) tiles the input with."
    ),
}


# -- one model, in the subprocess ----------------------------------------------------------------
def stage(name: str) -> None:
    print(f"STAGE {name} {time.time():.3f}", flush=True)


def worker(source: str, name: str, exporter: str, out: Path) -> None:
    import torch

    import zoo_reference as zr

    torch.set_num_threads(2)
    record: dict = {}
    started = time.time()
    size = zr.input_size(source, name)
    stage("build")
    model = zr.build_model(source, name)
    record["revived"] = model.revived
    folder = WORK / f"{source}-{name}-{exporter}"  # models over 2 GB export a file per weight
    shutil.rmtree(folder, ignore_errors=True)
    path = folder / "model.onnx"
    stage("export")
    t0 = time.time()
    dynamic = True
    try:
        zr.export_model(model, exporter, path, size)
    except zr.ExportFailed as error:
        try:  # a fixed batch often exports where a dynamic one does not
            zr.export_model(model, exporter, path, size, dynamic_batch=False)
            dynamic = False
            record["note"] = f"exported with a fixed batch of {zr.BATCH}; dynamic: {error}"
        except zr.ExportFailed:
            record.update(outcome="export failed", message=str(error))
    record["export_s"] = round(time.time() - t0, 1)
    record["dynamic_batch"] = dynamic
    scratch = Path(tempfile.mkdtemp(dir=folder))  # models over 2 GiB are saved here to be run
    if "outcome" not in record:
        stage("compare")
        t0 = time.time()
        comparison, augmented = zr.compare(model, path, size, scratch=scratch)
        record.update(comparison.as_dict())
        record["compare_s"] = round(time.time() - t0, 1)
        del model
        if augmented is not None and comparison.outcome != "error":
            stage("timing")
            try:
                record.update(zr.time_ratio(path, augmented, size,
                                            batch=1 if dynamic else zr.BATCH, scratch=scratch))
            except Exception as error:  # noqa: BLE001 - recorded, the rest stands
                record["timing_error"] = zr.one_line(error)
        if record["outcome"] != "match":
            record["kept"] = str(path)
    shutil.rmtree(scratch, ignore_errors=True)
    if record.get("outcome") in ("match", "export failed"):
        shutil.rmtree(folder, ignore_errors=True)
    record["worker_s"] = round(time.time() - started, 1)
    out.write_text(json.dumps(record))


# -- the driver ----------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_one(source: str, name: str, exporter: str, timeout: float, memory: float) -> dict:
    """Run the worker in a subprocess; a timeout, a crash or the memory limit is a record."""
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / f"{source}-{name}-{exporter}.json"
    log = WORK / f"{source}-{name}-{exporter}.log"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", source, name, exporter,
               "--out", str(out)]
    started = time.time()
    peak, killed = 0, None
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        while process.poll() is None:
            time.sleep(0.5)
            peak = max(peak, rss_bytes(process.pid))
            elapsed = time.time() - started
            if elapsed > timeout:
                killed = f"did not finish within {timeout:.0f} s"
            elif peak > memory:
                killed = f"used over {memory / 2**30:.0f} GiB of memory"
            if killed:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
    wall = round(time.time() - started, 1)
    last_stage = "start"
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("STAGE "):
            last_stage = line.split()[1]
    if killed is None and process.returncode == 0 and out.exists():
        record = json.loads(out.read_text())
    else:
        tail = [line for line in log.read_text(errors="replace").splitlines()
                if line.strip() and not line.startswith("STAGE ")][-3:]
        why = killed or f"exit status {process.returncode}"
        record = {
            "outcome": "timeout" if killed and "finish" in killed else "crashed",
            "message": f"{why} during the {last_stage} stage"
                       + (f"; last output: {' | '.join(tail)[-400:]}" if tail and not killed
                          else ""),
            "stage": last_stage, "log": str(log),
        }
    record.update(source=source, model=name, exporter=exporter, wall_s=wall,
                  peak_rss_gib=round(peak / 2**30, 2), augmenter=augmenter_version())
    return record


def augmenter_version() -> str:
    """The commit the run used, "+modified" where the augment package had local changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "server/gradcam_server/augment")
    return git("rev-parse", "--short", "HEAD") + ("+modified" if dirty else "")


def load_records(path: Path) -> list[dict]:
    """Every record, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key_of(record: dict) -> tuple[str, str, str]:
    return record["source"], record["model"], record["exporter"]


def latest(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    """The latest record of each (source, model, exporter)."""
    return {key_of(record): record for record in records}


def planned(sources, models, exporters) -> list[tuple[str, str, str]]:
    import zoo_reference as zr

    plan = []
    for source in sources:
        names = zr.model_names(source)
        if models:
            names = [n for n in names if n in models]
        sizes = {}
        for n in names:
            try:
                sizes[n] = zr.parameter_count(source, n)
            except Exception:  # noqa: BLE001 - unknown size: last
                sizes[n] = float("inf")
        for exporter in exporters:
            plan += [(source, n, exporter) for n in sorted(names, key=lambda n: (sizes[n], n))]
    return plan


# -- the report ----------------------------------------------------------------------------------
def _number(value, digits: str) -> str:
    return "" if value is None else format(value, digits)


def _layer(record: dict) -> str:
    layer = record.get("layer")
    if not layer:
        return ""
    module = record.get("module")
    shown = layer if len(layer) <= 48 else "..." + layer[-45:]
    return f"`{module}` (`{shown}`)" if module else f"`{shown}`"


def _layout(record: dict) -> str:
    layout = record.get("layout") or ""
    if layout == "tokens":
        prefix = record.get("prefix_tokens")
        grid = record.get("grid") or "run-time grid"
        return f"tokens ({prefix if prefix is not None else '?'} + {grid})"
    return layout


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_report(records: list[dict], path: Path = REPORT) -> None:
    import zoo_reference as zr

    results = latest(records)
    commands = list(dict.fromkeys(r["command"] for r in records if r.get("command")))

    everything = [(s, n, e) for s in zr.SOURCES for e in zr.EXPORTERS for n in zr.model_names(s)]
    order = {key: i for i, key in enumerate(everything)}
    done = sorted((k for k in results if k in order), key=lambda k: (k[0], k[1], order[k]))
    missing = [k for k in everything if k not in results]
    outcomes = [*zr.OUTCOMES, *EXTRA_OUTCOMES]
    dates = sorted(r.get("date", "") for r in results.values() if r.get("date"))
    lines = [
        "# Grad-CAM on the model zoo",
        "",
        "Every torchvision classification model and a set of timm architectures, exported by "
        "both torch exporters (TorchScript: `dynamo=False, opset_version=17`; dynamo), augmented "
        "by `augment_model` with the defaults (default layer, Grad-CAM), and compared with "
        "independent references on two photos (image 0 for its top-1 class, image 1 for class "
        f"{zr.EXPLICIT_CLASS}): pytorch-grad-cam 1.5.7's `GradCAM` at the torch module whose "
        "output equals the ONNX target tensor (found by exposing that tensor and matching the "
        "forward-hook outputs of every module, or, where no module outputs it, of every torch "
        "function called in the forward, tapped through an identity module; its "
        "`reshape_transform` built from "
        "`explained_target`'s layout), and torch autograd's d logit / d that output. Random "
        "weights (nothing downloaded), BatchNorm calibrated on the scikit-image photos, "
        "zero-initialised linear layers (torchvision's ViT heads) given small random weights and "
        "layer scales initialised to a tiny constant (1e-6 or 1e-5) set to about 0.1, so that "
        "every block counts; 224 x 224 inputs except "
        + ", ".join(f"{n} ({s})" for (_, n), s in zr.INPUT_SIZES.items()) + ".",
        "",
        "- **r**: the lowest Pearson correlation over the two images between our `heatmap` and "
        "pytorch-grad-cam's map (a flat reference map counts 1 if ours is flat too).",
        "- **gradient error**: relative L2 error of our `gradients` against torch autograd, both "
        "seen as [N, C, h, w].",
        "- **explain/forward**: median onnxruntime time of the augmented session over the "
        "original one, batch 1, one intra-op thread, interleaved runs (3 to 9 pairs); the 2-core "
        "machine was shared with other work during the runs, so single ratios are noisy "
        "(`benchmarks/bench_augment.py` measures the cost carefully).",
        "- **outcome**: *match* (r >= 0.99 and gradient error <= 1e-2); *refused* "
        "(`AugmentError`, its message); *export failed* (the exporter's failure, or an export "
        "whose logits differ from torch's by over 1e-3); *mismatch* (augmented but not "
        "matching, or every map flat in both: silently wrong or useless); *no reference* (no "
        "torch module or function output equals the target, and why); *error* (our code "
        "broke without a clear refusal); *timeout* / *crashed* "
        "(the subprocess ran out of time or memory, or died).",
        "",
        "Goal: >= 95 % match, every other one refused clearly, 0 silently wrong.",
        "",
        "Produced by:",
        "",
        "```",
        *commands,
        "```",
        "",
        f"Results from {dates[0][:10] if dates else '-'} to {dates[-1][:10] if dates else '-'} "
        "(each record in `docs/ZOO.jsonl` has its date and command).",
        "",
        "## Summary",
        "",
        "| exporter | run | " + " | ".join(outcomes) + " | match share | not run |",
        "| --- | ---: | " + " | ".join("---:" for _ in outcomes) + " | ---: | ---: |",
    ]
    for source in zr.SOURCES:
        for exporter in zr.EXPORTERS:
            keys = [k for k in done if k[0] == source and k[2] == exporter]
            lines.append(_summary_row(f"{source} {exporter}", keys, results, outcomes,
                                      [k for k in missing if k[0] == source and k[2] == exporter]))
    lines.append(_summary_row("**all**", done, results, outcomes, missing))
    counts = Counter(results[k]["outcome"] for k in done)
    reached = [k for k in done if results[k]["outcome"] != "export failed"]
    matched = counts["match"]
    share = matched / len(reached) if reached else 0.0
    lines += [
        "",
        f"Of the {len(reached)} runs whose export succeeded, {matched} match "
        f"({100 * share:.1f} %; goal >= {100 * GOAL_SHARE:.0f} %), {counts['refused']} are "
        f"refused, {counts['mismatch']} are silently wrong (goal 0); "
        f"{len(missing)} (model, exporter) pairs have not been run.",
        "",
    ]
    problems = [k for k in done if results[k]["outcome"] not in ("match", "export failed")]
    if problems:
        lines += ["## Not matching", ""]
        for k in problems:
            r = results[k]
            cause = CAUSES.get(k) or CAUSES.get((k[0], k[1], "*"))
            lines.append(f"- **{k[1]}** ({k[0]}, {k[2]}), {r['outcome']}"
                         + (f" ({r['augmenter']})" if r.get("augmenter") else "")
                         + f": {_cell(r.get('message', ''), 500)}"
                         + (f" **Cause:** {cause}" if cause else ""))
        lines.append("")
    failed = [k for k in done if results[k]["outcome"] == "export failed"]
    if failed:
        lines += ["## Export failures", ""]
        for k in failed:
            lines.append(f"- {k[1]} ({k[0]}, {k[2]}): {_cell(results[k].get('message', ''), 300)}")
        lines.append("")
    lines += [
        "## Results",
        "",
        "| model | exporter | default layer (torch module, ONNX tensor) | layout | r | "
        "gradient error | explain/forward | outcome |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for k in done:
        r = results[k]
        outcome = r["outcome"]
        detail = r.get("message") or ""
        if r.get("note"):
            detail = f"{detail} ({r['note']})" if detail else r["note"]
        ratio = _number(r.get("ratio"), ".2f")
        if ratio and r.get("batch", 1) != 1:
            ratio += f" (batch {r['batch']})"
        lines.append(
            f"| {k[1]} ({k[0]}) | {k[2]} | {_layer(r)} | {_layout(r)} | "
            f"{_number(r.get('r'), '.4f')} | {_number(r.get('gradient_error'), '.1e')} | "
            f"{ratio} | {outcome}{': ' + _cell(detail) if detail and outcome != 'match' else ''} |"
        )
    earlier = [r for r in records if r is not results[key_of(r)]
               and r["outcome"] != results[key_of(r)]["outcome"]]
    if earlier:
        lines += ["", "## Earlier outcomes", "",
                  "Runs whose outcome changed when run again: the augmenter changed in between, "
                  "or the reference did (DenseNet: its target is a functional F.relu, which the "
                  "first reference did not look for; ViT-H/14 and RegNet-Y-128GF: the second "
                  "error was the reference failing to run a model over 2 GiB); "
                  "`augmenter` is the commit each ran, \"+modified\" with local changes):", ""]
        for r in earlier:
            now = results[key_of(r)]
            lines.append(
                f"- {r['model']} ({r['source']}, {r['exporter']}): {r['outcome']} with "
                f"{r.get('augmenter') or 'an earlier augmenter'}"
                + (f" ({_cell(r['message'], 200)})" if r.get("message") else "")
                + f"; now {now['outcome']} with {now.get('augmenter', '?')}"
            )
    if missing:
        lines += ["", "## Not run", "",
                  "Not run within the time the report was given (runs go smallest first, so "
                  "these are the largest); `python benchmarks/zoo.py` runs them, resuming.", ""]
        for source in zr.SOURCES:
            for exporter in zr.EXPORTERS:
                names = [k[1] for k in missing if k[0] == source and k[2] == exporter]
                if names:
                    lines.append(f"- {source} {exporter} ({len(names)}): {', '.join(names)}")
    lines.append("")
    lines += _kept_sections(path)
    path.write_text("\n".join(lines))


def _kept_sections(path: Path) -> list[str]:
    """The report's sections that other scripts write (KEPT_SECTIONS), carried over as they
    are, each up to the next "## " heading."""
    if not path.exists():
        return []
    old = path.read_text(encoding="utf-8").splitlines()
    kept: list[str] = []
    for heading in KEPT_SECTIONS:
        if heading in old:
            start = old.index(heading)
            end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")),
                       len(old))
            while end > start + 1 and not old[end - 1].strip():
                end -= 1  # its trailing blank lines: one is added back
            kept += [*old[start:end], ""]
    return kept


def _summary_row(label, keys, results, outcomes, missing) -> str:
    counts = Counter(results[k]["outcome"] for k in keys)
    reached = sum(1 for k in keys if results[k]["outcome"] != "export failed")
    share = f"{100 * counts['match'] / reached:.1f} %" if reached else "-"
    return (f"| {label} | {len(keys)} | " + " | ".join(str(counts[o]) for o in outcomes)
            + f" | {share} | {len(missing)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["torchvision", "timm"], action="append",
                        help="only this source (repeatable; default: both)")
    parser.add_argument("--models", help="comma-separated model names")
    parser.add_argument("--exporters", default="torchscript,dynamo",
                        help="comma-separated: torchscript, dynamo (in this order of runs)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--memory-gb", type=float, default=12, help="resident-set limit per run")
    parser.add_argument("--rerun", action="store_true", help="run again what has results")
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/ZOO.md only")
    parser.add_argument("--worker", nargs=3, metavar=("SOURCE", "MODEL", "EXPORTER"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.out)
        return
    records = load_records(RESULTS)
    results = latest(records)
    if args.report_only:
        write_report(records)
        return
    command = "python benchmarks/zoo.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    command = command.rstrip()
    models = set(args.models.split(",")) if args.models else None
    plan = planned(args.source or ["torchvision", "timm"], models, args.exporters.split(","))
    if models:
        unknown = models - {name for _, name, _ in plan}
        if unknown:
            parser.error(f"unknown models: {', '.join(sorted(unknown))}")
    for key in plan:
        if key in results and not args.rerun:
            continue
        print(f"{key[0]} {key[1]} {key[2]} ...", end=" ", flush=True)
        record = run_one(*key, timeout=args.timeout, memory=args.memory_gb * 2**30)
        record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record["command"] = command
        with RESULTS.open("a") as sink:
            sink.write(json.dumps(record) + "\n")
        records.append(record)
        results[key] = record
        write_report(records)
        print(f"{record['outcome']} ({record['wall_s']} s) {record.get('message', '')[:160]}",
              flush=True)


if __name__ == "__main__":
    main()

"""``analogllm measure`` and ``analogllm readback``: a programmed chip's real state back into the model.

    analogllm measure  MAP --seconds 86400 --reads 16 --out MEASURED   # the lab in silico
    analogllm readback MAP MEASURED --recipe finetune-tiny             # read back, evaluate, train LoRA

``measure`` needs only the map: it programs the chip instance ``analogllm verify`` programs from the
files, ages it and averages noisy reads, writing the measured-files layout a lab writes for a real
chip (docs/export-format.md, section 10). ``readback`` rebuilds the map's model on the measured chip,
scores it, trains one adapter per mode of a finetune recipe against it and saves the adapters beside
the map (``MAP/adapters/NAME/``). Two commands rather than ``readback --simulate``: a real lab runs only
the second one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from analogllm.cli.args import add_set_argument, parse_overrides

RESULTS_NAME = "readback-results.json"


def _reads(value: str) -> int | None:
    if value.lower() in ("inf", "infinite", "none"):
        return None
    try:
        reads = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'inf', got {value!r}") from None
    if reads < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'inf', got {value!r}")
    return reads


def register(sub: argparse._SubParsersAction) -> None:
    from analogllm.export.readback import READ_NOISE

    p = sub.add_parser("measure", help="simulate measuring a chip programmed from a map (the files a lab reads back)",
                       description="Program the chip instance of a map through the device model, age it, and write "
                                   "what a lab measures: per device the average of N noisy conductance reads and their "
                                   "spread (crossbar), or the phases and transmissions every mesh applies (photonic).")
    p.add_argument("map", type=Path, help="map folder written by `analogllm export`")
    p.add_argument("--out", type=Path, required=True, help="measurement folder to write (atomically)")
    p.add_argument("--seed", type=int, default=None, help="chip instance to program (default: the map's)")
    p.add_argument("--seconds", type=float, default=None, help="time since programming of the reads (default: the map's)")
    p.add_argument("--reads", type=_reads, default=16, help="reads averaged per device, or 'inf' for noise-free (default 16)")
    p.add_argument("--phase-read-std", type=float, default=0.005,
                   help="photonic: error of one phase estimate, rad (relative for transmissions; default 0.005)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the measurement noise (default 0)")
    p.set_defaults(func=run_measure)

    p = sub.add_parser("readback", help="run a model on a measured chip: evaluate it and train LoRA adapters against it",
                       description="Read measured conductances or mesh phases back into the map's model (the chip that "
                                   "really exists), score it, train one LoRA adapter per mode of a finetune recipe "
                                   "against it and save the adapters beside the map.")
    p.add_argument("map", type=Path, help="map folder the chip was programmed from")
    p.add_argument("measured", type=Path, help="measurement folder (`analogllm measure` or a lab's, same layout)")
    p.add_argument("--model", default=None, help="the model the map came from (default: the source in the manifest)")
    p.add_argument("--recipe", default="finetune-tiny",
                   help="finetune recipe for data, adapters, training and scoring (default finetune-tiny); its "
                        "model, chip and out are the map's, the measurement's and --out")
    add_set_argument(p)
    p.add_argument("--read-noise", choices=READ_NOISE, default="auto",
                   help="read noise of the chip: measured spreads, the device model, auto (measured when given), none")
    p.add_argument("--eval-only", action="store_true", help="only score the read-back chip, train no adapters")
    p.add_argument("--name", default="{mode}",
                   help="adapter folder name under OUT/adapters/ ('{mode}' is replaced by the mode; default '{mode}')")
    p.add_argument("--out", type=Path, default=None,
                   help=f"where adapters/NAME/ and {RESULTS_NAME} go (default: the map folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_readback)


def run_measure(args: argparse.Namespace) -> int:
    from analogllm.export.manifest import load_map
    from analogllm.export.readback import load_measured, simulate_measurement

    start = time.perf_counter()
    amap = load_map(args.map)
    out = simulate_measurement(amap, args.out, seed=args.seed, seconds=args.seconds, reads=args.reads,
                               phase_read_std=args.phase_read_std, noise_seed=args.noise_seed, progress=True)
    meta = load_measured(amap, out).meta
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    reads = "noise-free reads" if meta["reads"] is None else f"{meta['reads']} reads per device"
    print(f"wrote {out}: {len(amap.layers)} layers of chip {meta['source']['seed']} measured at t = {meta['seconds']:g} s "
          f"({reads}), {size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
    return 0


def _recipe(args: argparse.Namespace) -> Any:
    from analogllm.recipes import load_recipe
    from analogllm.training.finetune import FinetuneRecipe

    overrides = parse_overrides(args.set)
    fixed = [k for k in overrides if k.split(".")[0] in ("model", "chip", "out")]
    if fixed:
        raise ValueError(f"--set {fixed[0]}: readback takes the model from the map (or --model), the chip from the "
                         "measurement and the output folder from --out")
    return load_recipe(FinetuneRecipe, args.recipe, overrides)


def _adapter_dirs(out: Path, template: str, modes: tuple[str, ...]) -> dict[str, Path]:
    """Mode → the adapter folder it is saved to, refusing names that collide or would replace a foreign folder."""
    from analogllm.tuners.lora import ADAPTERS_DIR

    if len(modes) > 1 and "{mode}" not in template:
        raise ValueError(f"--name {template!r}: several modes would write the same folder; put '{{mode}}' in the name")
    dirs = {}
    for mode in modes:
        name = template.replace("{mode}", mode)
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"--name {template!r}: {name!r} is not a folder name")
        path = out / ADAPTERS_DIR / name
        if path.is_file() or (path.is_dir() and any(path.iterdir()) and not (path / "adapter_config.json").is_file()):
            raise ValueError(f"{path} exists and is not an adapter folder; choose another --name or --out")
        dirs[mode] = path
    return dirs


def _load_chip(args: argparse.Namespace, amap: Any, measured: Any) -> tuple[Any, Any, dict[str, float]]:
    """(model on the measured chip, tokenizer, per-layer deviation from the map's targets), reported."""
    from analogllm.export.readback import chip_from_measurement, deviation, load_source_model

    start = time.perf_counter()
    model, tokenizer = load_source_model(amap, args.model)
    chip_from_measurement(model, amap, measured, read_noise=args.read_noise)
    model.eval()
    dev = deviation(model, amap)
    worst = max(dev, key=dev.get)
    reads = "noise-free" if measured.reads is None else f"{measured.reads} reads"
    print(f"read back {len(dev)} layers from {measured.path} (t = {measured.seconds:g} s, {reads}) in "
          f"{time.perf_counter() - start:.1f} s; read noise: {args.read_noise}")
    print(f"chip vs map targets: ||W_chip - W_target|| / ||W_target|| mean {sum(dev.values()) / len(dev):.3g}, "
          f"worst {dev[worst]:.3g} ({worst})")
    return model, tokenizer, dev


def _teacher(args: argparse.Namespace, amap: Any, recipe: Any, modes: tuple[str, ...]) -> Any:
    """With ``train.distill``: the map's model in digital mode (its exact targets) as the adapters' teacher."""
    from analogllm.chip import set_mode
    from analogllm.export.readback import load_source_model
    from analogllm.training.hwa import Teacher

    if not (recipe.train.distill.enabled and modes):
        return None
    twin, _ = load_source_model(amap, args.model)
    return Teacher(set_mode(twin, "digital"))


def run_readback(args: argparse.Namespace) -> int:
    from analogllm.chip import mode as hardware_mode
    from analogllm.export.manifest import load_map
    from analogllm.export.readback import load_measured, save_readback_adapters, write_json
    from analogllm.training.finetune import FinetuneResult, adapt, recipe_texts, report_markdown, score

    progress = not args.quiet
    recipe = _recipe(args)
    amap = load_map(args.map)  # bad maps and measurements fail here, before the model is loaded
    measured = load_measured(amap, args.measured)
    out = args.out or args.map
    modes = () if args.eval_only else tuple(recipe.train.modes)
    dirs = _adapter_dirs(out, args.name, modes)
    model, tokenizer, dev = _load_chip(args, amap, measured)
    teacher = _teacher(args, amap, recipe, modes)

    source = args.model or amap.manifest["model"].get("source")
    seed = int(amap.manifest["chip"]["seed"])
    chip = dataclasses.replace(recipe.chip, profile=None, overrides={}, seeds=(seed,), ages=(measured.seconds,))
    recipe = dataclasses.replace(recipe, model=str(source), label="read-back chip", baseline=None, chip=chip,
                                 out=str(out))
    train_blocks, texts = recipe_texts(recipe, tokenizer)
    digital = {}
    if recipe.eval.digital:
        with hardware_mode(model, "digital"):  # the map's targets, computed exactly
            digital = {k: score(model, v, recipe, f"map targets ({k})", progress) for k, v in texts.items()}
    scores: dict[str, dict[str, list]] = {recipe.label: {
        k: [(seed, measured.seconds, score(model, v, recipe, f"read-back chip ({k})", progress))] for k, v in texts.items()}}
    first = next(iter(texts))
    print(f"read-back chip: perplexity {scores[recipe.label][first][0][2].perplexity:.4g} on {first}")

    def save(peft_model: Any, mode: str, info: dict[str, Any]) -> str:
        return str(save_readback_adapters(peft_model, dirs[mode], results={"mode": mode, **info}))

    results = [adapt(model, mode, seed, measured.seconds, train_blocks, texts, scores, recipe, save, progress, print,
                     teacher) for mode in modes]
    result = FinetuneResult(recipe=recipe, texts=tuple(texts), digital=digital, scores=scores, modes=tuple(results))
    print()
    print("(digital: the map's targets computed exactly)")
    print(report_markdown(result))
    if not args.eval_only or args.out is not None:
        summary = {"map": str(amap.path), "map_sha256": amap.manifest.get("manifest_sha256"),
                   "measured": str(measured.path), "measurement_sha256": measured.digest,
                   "seconds": measured.seconds, "reads": measured.reads, "read_noise": args.read_noise,
                   "deviation": dev, **result.to_dict()}
        write_json(Path(out) / RESULTS_NAME, _finite(summary))
        print(f"\nwrote {', '.join(str(d) for d in dirs.values()) or 'no adapters'} and {Path(out) / RESULTS_NAME}")
    return 0


def _finite(data: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN)."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data

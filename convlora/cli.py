"""The ``convlora`` command: inspect, convert, doctor, merge.

    convlora inspect PIPELINE_DIR [--preset full]     what each preset adapts, with parameter counts
    convlora inspect LORA_FILE                        format, training metadata, ranks / alphas
    convlora convert IN OUT --to diffusers|kohya|native|peft [--component unet]
                     [--kohya-names ldm --base PIPELINE_DIR]
    convlora doctor LORA_FILE [--base PIPELINE_DIR]   which loaders accept the file, and why not
    convlora merge PIPELINE_DIR LORA_FILE OUT_DIR [--overwrite]   a pipeline folder with the LoRA merged in
    convlora resize IN OUT --rank K [--conv-rank K2] [--dynamic sv_ratio|sv_fro|sv_cumulative --dynamic_param X]
    convlora extract BASE TUNED OUT --rank K [--conv-rank K2] [--format F] [--min-diff X]
    convlora merge-loras A B [...] [--weights wA wB ...] OUT [--rank K] [--format F]

Errors print one line on stderr: exit status 2 for bad input (a file, header or argument that is
not what it should be), 1 for an operating-system failure (permissions, a full disk).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError

from convlora import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convlora", description="Convolutional and diffusion LoRA toolkit.")
    parser.add_argument("--version", action="version", version=f"convlora {__version__}")
    commands = parser.add_subparsers(dest="command")

    inspect = commands.add_parser(
        "inspect",
        help="what each preset adapts in a pipeline, or what a LoRA file holds",
        description="For a diffusers pipeline folder: the modules each UNet / text-encoder preset targets, "
        "with LoRA vs base parameter counts (built from the configs; no weights are read). "
        "For a LoRA file or PEFT folder: its format, training metadata, modules, ranks and alphas.",
    )
    inspect.add_argument("target", help="pipeline folder, LoRA .safetensors file, or PEFT adapter folder")
    inspect.add_argument("--preset", choices=("attn", "attn-ff", "full"), help="show one UNet preset, module by module")
    inspect.add_argument("--text-encoder-preset", choices=("attn", "attn-mlp"), help="show one text-encoder preset, module by module")
    inspect.add_argument("--rank", type=int, default=8, help="rank for the parameter counts (default 8)")
    inspect.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 convs (default: --rank)")
    inspect.add_argument("--include-conv-in-out", action="store_true", help="also count conv_in / conv_out")

    convert = commands.add_parser(
        "convert",
        help="convert a LoRA file between formats",
        description="Read IN in any format (detected) and write OUT as --to. Every key of IN is converted or the "
        "command fails naming the leftovers.",
    )
    convert.add_argument("src", metavar="IN", help="LoRA file or PEFT adapter folder")
    convert.add_argument(
        "dst", metavar="OUT",
        help="file to write (a folder for --to peft; for --to diffusers a folder gets pytorch_lora_weights.safetensors)",
    )  # fmt: skip
    convert.add_argument("--to", required=True, choices=("diffusers", "kohya", "native", "peft"), help="output format")
    convert.add_argument(
        "--component", choices=("unet", "text_encoder", "text_encoder_2"),
        help="single-model input -> diffusers/kohya: which pipeline component it adapts; pipeline input -> peft: which component to keep",
    )  # fmt: skip
    convert.add_argument(
        "--kohya-names", choices=("diffusers", "ldm"), default=None,
        help="--to kohya: UNet modules by their diffusers paths (default for SD-1.x files; diffusers, A1111 on SD-1.x "
        "layouts, ComfyUI) or by their LDM names in the --base pipeline's layout (A1111 and ComfyUI on any layout; not "
        "diffusers' StableDiffusionPipeline). SDXL files get LDM names by default, as kohya writes them (SDXL's layout "
        "unless --base)",
    )  # fmt: skip
    convert.add_argument("--base", help="--kohya-names ldm: the diffusers pipeline folder whose unet/config.json gives the layout")

    doctor = commands.add_parser(
        "doctor",
        help="which loaders (diffusers, ComfyUI, A1111, PEFT) accept a LoRA file, and why not",
        description="Checks key styles, unknown suffixes, alpha handling and metadata against what each loader "
        "does; with --base, also that every module exists in that pipeline with fitting shapes. Exit status 1 "
        "when some loader would refuse the file or compute something else.",
    )
    doctor.add_argument("file", help="LoRA file or PEFT adapter folder")
    doctor.add_argument("--base", help="diffusers pipeline folder the LoRA is meant for")

    merge = commands.add_parser(
        "merge",
        help="write a pipeline folder with a LoRA merged into its weights",
        description="Loads the pipeline, loads the LoRA (any format) into its UNet / text encoder, merges "
        "W + (alpha/r) B A into the weights (float32 math) and saves the result in the diffusers folder layout, "
        "each component in the dtype it was stored in. OUT is written to a temporary folder and renamed into "
        "place when complete.",
    )
    merge.add_argument("pipeline", help="diffusers pipeline folder")
    merge.add_argument("lora", help="LoRA file or PEFT adapter folder")
    merge.add_argument("out", help="output pipeline folder (must not exist, unless --overwrite)")
    merge.add_argument(
        "--overwrite", action="store_true",
        help="replace OUT if it exists, even when it is the input pipeline (files the pipeline does not write are kept)",
    )  # fmt: skip
    _add_lowrank_commands(commands)
    return parser


_FORMAT_CHOICES = ("diffusers", "kohya", "native", "peft")
_COMPONENT_CHOICES = ("unet", "text_encoder", "text_encoder_2")


def _add_lowrank_commands(commands) -> None:
    """``resize``, ``extract`` and ``merge-loras``: SVD-based commands on neutral LoRA weights."""
    resize = commands.add_parser(
        "resize",
        help="a LoRA at a lower rank: the best approximation of each module's update (SVD)",
        description="Each module's W update (alpha/r) B A is replaced by its best rank-K approximation "
        "(truncated SVD; modules already at rank <= K are kept exactly). The scaling alpha/r stays what it was, so "
        "alpha becomes (alpha/r) K, as in kohya's resize_lora.py. OUT keeps IN's format and metadata, with a note "
        "in ss_training_comment.",
    )
    resize.add_argument("src", metavar="IN", help="LoRA file or PEFT adapter folder")
    resize.add_argument("dst", metavar="OUT", help="file (PEFT: folder) to write, in IN's format")
    resize.add_argument("--rank", type=int, required=True, help="new rank (with --dynamic: the largest rank kept)")
    resize.add_argument("--conv-rank", "--new_conv_rank", dest="conv_rank", type=int, default=None,
                        help="new rank of k x k convs (default: --rank)")
    resize.add_argument(
        "--dynamic", "--dynamic_method", dest="dynamic", default=None,
        help="choose each module's rank from its singular values, as kohya: sv_ratio (keep s_i > s_1/X), "
        "sv_cumulative (sum of kept s_i >= X of the sum), sv_fro (Frobenius share >= X); kohya keeps one value more "
        "than the criterion needs",
    )  # fmt: skip
    resize.add_argument("--dynamic_param", "--dynamic-param", dest="dynamic_param", type=float, default=None,
                        help="X of --dynamic: a ratio >= 1 for sv_ratio, a fraction in (0, 1] otherwise")
    resize.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (even when it is IN)")

    extract = commands.add_parser(
        "extract",
        help="a LoRA of the difference between a tuned model and its base (SVD per layer)",
        description="For every Linear and Conv of BASE and TUNED (diffusers pipeline folders, or single models "
        "saved with save_pretrained), the best rank-K approximation of W_tuned - W_base, alpha = K. Weights are "
        "read from safetensors one tensor at a time. Modules with max|W_tuned - W_base| <= --min-diff are skipped "
        "and counted; tensors a LoRA cannot carry (biases, norms, embeddings) that differ are counted too.",
    )
    extract.add_argument("base", metavar="BASE", help="base model: pipeline folder or save_pretrained model folder")
    extract.add_argument("tuned", metavar="TUNED", help="tuned model of the same architecture")
    extract.add_argument("dst", metavar="OUT", help="LoRA file (PEFT: folder) to write")
    extract.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1-conv modules")
    extract.add_argument("--conv-rank", type=int, default=None, help="rank of k x k convs (default: --rank)")
    extract.add_argument("--format", choices=_FORMAT_CHOICES, default=None,
                         help="output format (default: diffusers for pipelines, native for single models)")
    extract.add_argument("--min-diff", type=float, default=0.0,
                         help="skip modules whose weights differ by at most this (max |dW|; default 0: identical ones)")
    extract.add_argument(
        "--component", choices=_COMPONENT_CHOICES,
        help="single-model folders -> diffusers/kohya: which pipeline component they are; pipelines -> peft: the one to keep",
    )  # fmt: skip
    extract.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    merge_loras = commands.add_parser(
        "merge-loras",
        help="one LoRA equal to a weighted sum of LoRAs (exact, or SVD to --rank)",
        description="OUT's update is sum_i w_i dW_i exactly: ranks are concatenated and each file's alpha/r "
        "(or alpha/sqrt(r) with rsLoRA) is folded into its B. A module in one file only is carried with its weight; "
        "a weight of 0 drops that file's modules; negative weights subtract. --rank K then keeps the best rank-K "
        "approximation of every module with a larger rank.",
    )
    merge_loras.add_argument("paths", metavar="FILE", nargs="*", help="the LoRA files (any formats), then OUT")
    merge_loras.add_argument("--weights", nargs="+", default=None, metavar="W",
                             help="one weight per file (default 1 each)")
    merge_loras.add_argument("--rank", type=int, default=None, help="SVD every merged module to at most this rank")
    merge_loras.add_argument("--conv-rank", type=int, default=None, help="with --rank: rank of k x k convs (default: --rank)")
    merge_loras.add_argument("--format", choices=_FORMAT_CHOICES, default=None, help="output format (default: the first file's)")
    merge_loras.add_argument(
        "--component", choices=_COMPONENT_CHOICES,
        help="single-model inputs -> diffusers/kohya: which pipeline component they adapt; pipelines -> peft: the one to keep",
    )  # fmt: skip
    merge_loras.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = {"inspect": _inspect, "convert": _convert, "doctor": _doctor, "merge": _merge, "resize": _resize,
               "extract": _extract, "merge-loras": _merge_loras}[args.command]  # fmt: skip
    try:
        return handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"convlora {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write (a full disk) as its own error
        print(f"convlora {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---- inspect -------------------------------------------------------------------------------------
def _inspect(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir() and ((target / "model_index.json").is_file() or (target / "unet" / "config.json").is_file()):
        return _inspect_pipeline(target, args)
    return _inspect_lora(target)


def _inspect_pipeline(folder: Path, args: argparse.Namespace) -> int:
    from convlora.diffusion import TEXT_ENCODER_PRESETS, UNET_PRESETS, text_encoder_lora_config, unet_lora_config
    from convlora.diffusion.pipeline import build_pipeline_skeleton
    from convlora.diffusion.presets import UNET_CONV_IN_OUT

    from convlora.diffusion.families import detect_family

    models = build_pipeline_skeleton(folder)
    conv_rank = args.conv_rank
    print(f"pipeline: {folder} ({detect_family(folder).pipeline_class_name})")
    if "unet" in models:
        unet = models["unet"]
        presets = [args.preset] if args.preset else list(UNET_PRESETS)
        print(f"unet: {type(unet).__name__}, {_count(unet):,} parameters; rank {args.rank}, 3x3 conv rank {conv_rank or args.rank}")
        for preset in presets:
            has_convs = preset == "full" or args.include_conv_in_out
            config = unet_lora_config(
                preset, rank=args.rank, conv_rank=conv_rank if has_convs else None, include_conv_in_out=args.include_conv_in_out
            )
            kinds = UNET_PRESETS[preset] + (UNET_CONV_IN_OUT if args.include_conv_in_out else ())
            _print_preset(f"unet preset {preset!r}", unet, config, kinds, per_module=bool(args.preset))
    for name in ("text_encoder", "text_encoder_2"):
        if name not in models:
            continue
        te = models[name]
        presets = [args.text_encoder_preset] if args.text_encoder_preset else list(TEXT_ENCODER_PRESETS)
        print(f"{name}: {type(te).__name__}, {_count(te):,} parameters; rank {args.rank}")
        for preset in presets:
            config = text_encoder_lora_config(preset, rank=args.rank)
            _print_preset(f"{name.replace('_', '-')} preset {preset!r}", te, config, TEXT_ENCODER_PRESETS[preset],
                          per_module=bool(args.text_encoder_preset))
    return 0


def _print_preset(title: str, model, config, kinds, per_module: bool) -> None:
    import convlora
    from convlora.diffusion import lora_parameter_count
    from convlora.diffusion.presets import suffix_regex

    plan = convlora.plan_injection(model, config)
    modules = dict(model.named_modules())
    patterns = [(kind, suffix_regex([kind])) for kind in kinds]
    rows: dict[str, list[int]] = {}
    total_lora = 0
    for path, spec in plan.items():
        kind = next(k for k, rx in patterns if re.fullmatch(rx, path))
        lora = lora_parameter_count(modules[path], spec.r)
        base = modules[path].weight.numel()
        row = rows.setdefault(kind, [0, 0, 0])
        row[0] += 1
        row[1] += base
        row[2] += lora
        total_lora += lora
    total = _count(model)
    print(f"  {title}: {len(plan)} modules, {total_lora:,} LoRA parameters ({100 * total_lora / total:.2f}% of {total:,})")
    print(f"    {'targets':<26}{'modules':>8}{'base params':>14}{'LoRA params':>14}")
    for kind in kinds:
        if kind in rows:
            n, base, lora = rows[kind]
            print(f"    {kind:<26}{n:>8}{base:>14,}{lora:>14,}")
        else:
            print(f"    {kind:<26}{'-':>8}   (not in this model)")
    if per_module:
        print(f"    {'module':<62}{'type':<8}{'base shape':<18}{'r':>3}{'LoRA params':>13}")
        for path, spec in plan.items():
            module = modules[path]
            shape = "x".join(str(s) for s in module.weight.shape)
            print(f"    {path:<62}{type(module).__name__:<8}{shape:<18}{spec.r:>3}{lora_parameter_count(module, spec.r):>13,}")


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _inspect_lora(path: Path) -> int:
    from convlora.diffusion.pipeline import TRAINING_METADATA
    from convlora.formats import read_lora_file

    fmt, weights = read_lora_file(path)
    print(f"file: {path}")
    print(f"format: {fmt}")
    known = {k: v for k, v in weights.metadata.items() if k in TRAINING_METADATA}
    if known:
        print("training:")
        for key in TRAINING_METADATA:
            if key in known:
                print(f"  {key:<24} {known[key]}")
    other = {k: v for k, v in weights.metadata.items() if k not in TRAINING_METADATA}
    if other:
        print("other metadata:")
        for key, value in sorted(other.items()):
            print(f"  {key:<24} {value if len(value) <= 100 else value[:97] + '...'}")
    components = weights.components() or [""]
    for component in components:
        modules = weights.component(component) if component else weights.modules
        params = sum(t.numel() for m in modules.values() for t in m.tensors.values())
        kinds = Counter(m.kind.label for m in modules.values())
        ranks = Counter(m.r for m in modules.values())
        alphas = Counter(m.alpha for m in modules.values())
        convs = sum(m.is_spatial_conv for m in modules.values())
        print(f"{component or 'model'}: {len(modules)} modules ({convs} 3x3 convs), {params:,} adapter parameters")
        if set(kinds) != {"lora"}:
            print("  kind:  " + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()))
        print("  rank:  " + ", ".join(f"{r} x{n}" for r, n in ranks.most_common()))
        print("  alpha: " + ", ".join(f"{a:g} x{n}" for a, n in alphas.most_common()) + ("  (rsLoRA)" if weights.use_rslora else ""))
    return 0


# ---- convert / doctor / merge --------------------------------------------------------------------
def _convert(args: argparse.Namespace) -> int:
    from convlora.formats import convert_lora_file

    ldm_names = None
    if args.kohya_names == "ldm":
        if args.to != "kohya" or not args.base:
            raise ValueError("--kohya-names ldm needs --to kohya and --base PIPELINE_DIR (the UNet layout the names number)")
        ldm_names = _ldm_names_of(Path(args.base))
    src_fmt, written = convert_lora_file(args.src, args.dst, args.to, component=args.component, ldm_names=ldm_names,
                                         diffusers_names=args.kohya_names == "diffusers")
    print(f"{args.src} ({src_fmt}) -> {written} ({args.to})")
    return 0


def _ldm_names_of(pipeline: Path):
    import json

    from convlora.formats.ldm_names import LDMNames

    config = pipeline / "unet" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: --base must be a diffusers pipeline folder")
    try:
        return LDMNames.from_config(json.loads(config.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None


def _doctor(args: argparse.Namespace) -> int:
    from convlora.diffusion.pipeline import build_pipeline_skeleton
    from convlora.formats.detect import lora_file_of
    from convlora.formats.doctor import diagnose
    from convlora.formats.peft import read_peft_config

    if lora_file_of(args.file)[1]:
        read_peft_config(args.file)  # an adapter_config.json that is not a LoRA config: one line, not a diagnosis
    base = build_pipeline_skeleton(args.base) if args.base else None
    diagnosis = diagnose(args.file, base=base)
    print(diagnosis.render())
    return 0 if diagnosis.healthy else 1


def _merge(args: argparse.Namespace) -> int:
    from diffusers import DiffusionPipeline

    import convlora
    from convlora.atomic import replace_folder
    from convlora.diffusion import load_pipeline_lora
    from convlora.diffusion.pipeline import stored_dtypes
    from convlora.formats import read_lora_file

    source, out = Path(args.pipeline), Path(args.out)
    _check_merge_target(source, out, args.overwrite)
    read_lora_file(args.lora)  # a bad file fails before the pipeline is loaded
    dtypes = stored_dtypes(source)
    _quiet_loading()
    pipe = DiffusionPipeline.from_pretrained(source)  # float32, so the merge math is float32
    names = ("unet", "text_encoder", "text_encoder_2")
    info = load_pipeline_lora(args.lora, **{name: getattr(pipe, name, None) for name in names})
    for name in names:
        if info[name]:
            convlora.merge_and_unload(getattr(pipe, name))
    _cast_to_stored_dtypes(pipe, dtypes, info)
    replace_folder(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    n_te, n_te2 = len(info["text_encoder"]) + len(info["text_encoder_2"]), len(info["text_encoder_2"])
    second = f" ({n_te2} of them in text_encoder_2)" if n_te2 else ""
    print(f"merged {len(info['unet'])} unet and {n_te} text-encoder modules{second} ({info['format']}) -> {args.out}")
    return 0


def _quiet_loading() -> None:
    """No progress bars from diffusers / transformers: the command's own lines (and one error line) only."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _check_merge_target(source: Path, out: Path, overwrite: bool) -> None:
    """OUT may not be the input pipeline, an existing folder or a file, unless ``--overwrite``."""
    if not source.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {source}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if overwrite:
        return
    if out.resolve() == source.resolve():
        raise ValueError(f"OUT {out} is the input pipeline folder; pass --overwrite to replace it with the merged one")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"OUT {out} exists and is not empty; pass --overwrite to replace it")


def _cast_to_stored_dtypes(pipe, dtypes: dict, info: dict) -> None:
    """Every tensor back in the dtype it was stored in; a merged weight that does not fit it is an error.

    Raises:
        ValueError: merged weights that hold NaN / inf in the stored dtype (e.g. beyond fp16's 65504), named.
    """
    import torch

    from convlora.state import check_finite

    for name, stored in dtypes.items():
        component = getattr(pipe, name, None)
        if not isinstance(component, torch.nn.Module):
            continue
        for key, tensor in component.state_dict(keep_vars=True).items():
            if key in stored and tensor.is_floating_point() and tensor.dtype != stored[key]:
                tensor.data = tensor.data.to(stored[key])
        merged = {f"{name}.{p}.weight": component.get_submodule(p).weight for p in info.get(name) or []}
        check_finite(merged, source=f"the merged {name} in its stored dtype")


# ---- resize / extract / merge-loras --------------------------------------------------------------
def _resize(args: argparse.Namespace) -> int:
    from convlora.formats import read_lora_file
    from convlora.lowrank import annotated, check_dynamic, resize_lora

    _check_rank(args.rank, "--rank")
    _check_rank(args.conv_rank, "--conv-rank")
    check_dynamic(args.dynamic, args.dynamic_param)
    out = _checked_output(args.dst, args.overwrite)
    fmt, weights = read_lora_file(args.src)
    resized, report = resize_lora(weights, args.rank, args.conv_rank, args.dynamic, args.dynamic_param)
    old = max(m.r for m in weights.modules.values())
    how = f"dynamic {args.dynamic} {args.dynamic_param:g}, at most rank {args.rank}" if args.dynamic else f"to rank {args.rank}"
    conv = f" (k x k convs {args.conv_rank})" if args.conv_rank not in (None, args.rank) else ""
    resized = annotated(resized, f"convlora resize from rank {old} {how}{conv}")
    for entry in report:
        print(f"{entry.path}: rank {entry.old_rank} -> {entry.new_rank}, Frobenius retained {entry.fro_retained:.2%}")
    written = _write_output(resized, out, fmt)
    kept = sum(e.new_rank == e.old_rank for e in report)
    shares = [e.fro_retained for e in report]
    print(f"resized {len(report) - kept} of {len(report)} modules ({kept} kept as they were); Frobenius retained: "
          f"mean {sum(shares) / len(shares):.2%}, min {min(shares):.2%}; {args.src} ({fmt}) -> {written}")  # fmt: skip
    return 0


def _extract(args: argparse.Namespace) -> int:
    from convlora.extract import extract_lora
    from convlora.formats import weights_for_format
    from convlora.lowrank import annotated

    _check_rank(args.rank, "--rank")
    _check_rank(args.conv_rank, "--conv-rank")
    out = _checked_output(args.dst, args.overwrite)
    weights, report = extract_lora(args.base, args.tuned, args.rank, args.conv_rank, args.min_diff)
    fmt = args.format or ("diffusers" if weights.components() else "native")
    rank, alpha, conv_rank, conv_alpha = weights.most_common()
    weights.metadata.update({"base_model": str(args.base), "rank": str(rank), "alpha": f"{alpha:g}"})
    if conv_rank is not None:
        weights.metadata.update({"conv_rank": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"})
    weights = annotated(weights, f"convlora extract of {args.tuned} - {args.base}")
    weights = weights_for_format(weights, fmt, args.component, source="the extracted LoRA")
    for path, share in report.extracted.items():
        print(f"{path}: rank {_extracted_rank(weights, path, args.component)}, Frobenius retained {share:.2%}")
    written = _write_output(weights, out, fmt)
    print(f"extracted {len(report.extracted)} modules; skipped {len(report.skipped)} with max|dW| <= {args.min_diff:g}")
    if report.other_changed:
        shown = ", ".join(report.other_changed[:5]) + (", ..." if len(report.other_changed) > 5 else "")
        print(f"{len(report.other_changed)} other tensor(s) differ, which a LoRA cannot carry: {shown}")
    print(f"{args.tuned} - {args.base} -> {written} ({fmt})")
    return 0


def _extracted_rank(weights, path: str, component: str | None) -> int:
    """The rank of ``path`` (an extract path, before ``--component`` may have prefixed it)."""
    module = weights.modules.get(path) or weights.modules[f"{component}.{path}"]
    return module.r


def _merge_loras(args: argparse.Namespace) -> int:
    from convlora.formats import read_lora_file, weights_for_format
    from convlora.lowrank import annotated, merge_loras, resize_lora

    files, factors, out = _merge_loras_operands(args.paths, args.weights)
    _check_rank(args.rank, "--rank")
    _check_rank(args.conv_rank, "--conv-rank")
    if args.conv_rank is not None and args.rank is None:
        raise ValueError("--conv-rank needs --rank")
    out = _checked_output(out, args.overwrite)
    read = [read_lora_file(f) for f in files]
    fmt = args.format or read[0][0]
    merged = merge_loras([(w, factor) for (_, w), factor in zip(read, factors)], sources=files)
    how = " + ".join(f"{factor:g} x {f}" for f, factor in zip(files, factors))
    if args.rank is not None:
        merged, report = resize_lora(merged, args.rank, args.conv_rank)
        how += f", SVD to rank {args.rank}" + (f" (k x k convs {args.conv_rank})" if args.conv_rank else "")
        for entry in report:
            if entry.new_rank != entry.old_rank:
                print(f"{entry.path}: rank {entry.old_rank} -> {entry.new_rank}, Frobenius retained {entry.fro_retained:.2%}")
    merged = weights_for_format(annotated(merged, f"convlora merge-loras {how}"), fmt, args.component, source=files[0])
    written = _write_output(merged, out, fmt)
    ranks = Counter(m.r for m in merged.modules.values())
    print(f"merged {len(files)} files into {len(merged.modules)} modules (rank " +
          ", ".join(f"{r} x{n}" for r, n in ranks.most_common()) + f") -> {written} ({fmt})")  # fmt: skip
    return 0


def _merge_loras_operands(paths: list[str], weights: list[str] | None) -> tuple[list[str], list[float], str]:
    """``(input files, their weights, OUT)`` from ``FILE... [--weights W...] OUT``.

    ``--weights`` takes values up to the first that is not a number: the rest (OUT) are paths.
    """
    import math

    paths, values = list(paths), []
    for i, token in enumerate(weights or []):
        try:
            values.append(float(token))
        except ValueError:
            paths += weights[i:]
            break
    if len(paths) < 2:
        raise ValueError("merge-loras needs at least one LoRA file and OUT")
    files, out = paths[:-1], paths[-1]
    if weights is None:
        values = [1.0] * len(files)
    if len(values) != len(files):
        raise ValueError(f"--weights has {len(values)} value(s) for {len(files)} file(s); give one weight per file")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"--weights must be finite numbers, got {bad[0]}")
    return files, values, out


def _check_rank(value: int | None, what: str) -> None:
    """An optional rank argument, checked before any file is read."""
    from convlora.state import checked_rank

    if value is not None:
        checked_rank(value, what)


def _checked_output(path: str, overwrite: bool) -> Path:
    """OUT may not exist unless ``--overwrite`` (checked before any work)."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ValueError(f"OUT {out} exists; pass --overwrite to replace it")
    return out


def _write_output(weights, out: Path, fmt: str) -> Path:
    """Write ``weights`` as ``fmt`` at ``out`` atomically: a file, or (PEFT) a whole folder renamed into place."""
    from convlora.atomic import replace_folder
    from convlora.formats import write_lora_file

    if fmt != "peft":
        return write_lora_file(weights, out, fmt)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} exists and is not a folder (a PEFT adapter is a folder)")
    return replace_folder(out, lambda tmp: write_lora_file(weights, tmp, fmt))


if __name__ == "__main__":
    sys.exit(main())

"""``lamina diffusion train|sample|inpaint|upscale|edit|export``: image diffusion models on a CPU."""

from __future__ import annotations

import argparse
from typing import Any

from lamina.cli.flags import add_alias, add_config_file, add_fields, merged, print_config, values
from lamina.config import TrainConfig

HELP = ("train a small image diffusion model (DDPM/DDIM) and sample, inpaint, upscale, edit or export "
        "synthetic labeled images")  # fmt: skip


def _sections() -> dict[str, type]:
    from lamina.diffusion.data import ImageDataConfig
    from lamina.diffusion.schedulers import NoiseConfig
    from lamina.diffusion.training import DiffusionConfig
    from lamina.diffusion.unet import UNetConfig

    return {"unet": UNetConfig, "noise": NoiseConfig, "images": ImageDataConfig, "train": TrainConfig,
            "diffusion": DiffusionConfig}  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``diffusion`` verb and its actions."""
    from lamina.diffusion.files import (
        EditConfig,
        ExportConfig,
        InpaintConfig,
        OutputConfig,
        SamplingConfig,
        UpscaleConfig,
    )

    p = sub.add_parser("diffusion", help=HELP, description=HELP + ". MODEL is a run folder of "
                       "`lamina diffusion train` (or its last/, best/, checkpoints/step-N/).")  # fmt: skip
    acts = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = acts.add_parser(
        "train",
        help="train a UNet on digits, sample-image patches or a folder of images",
        description="Train a DDPM UNet on the one trainer (checkpoints, --resume, EMA weights, curves.png, "
        "report.html). Sections: unet (its shape; image_size, in_channels and num_classes come from the "
        "images), noise (the schedule), images (the data), train (a TrainConfig), diffusion (guidance "
        "label dropout, EMA, super-resolution factor). Every field is a --SECTION.FIELD flag and a key of "
        "the --config YAML file.",
        epilog="example: lamina diffusion train --images.dataset digits --train.max_steps 2000 --out runs/digits",
    )
    add_config_file(t)
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output folder"
    )
    t.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    add_alias(t, "--out", TrainConfig, "out_dir", "train")
    for section, cls in _sections().items():
        add_fields(t, cls, section)
    t.set_defaults(func=_train)

    verbs = {
        "sample": "sample a PNG grid (class-conditional: classes cycled, with guidance); --evaluate scores digits",
        "inpaint": "fill a masked region of images (RePaint); unmasked pixels are kept exactly",
        "upscale": "enlarge an image file or a folder of images by the model's factor (--evaluate, or "
        "--input held_out: downsample first and print PSNR vs bicubic)",
        "edit": "SDEdit images: noise them to strength x T and denoise (0: unchanged, 1: a new sample)",
        "export": "write synthetic labeled images in class folders (data augmentation)",
    }
    for name, helptext in verbs.items():
        a = acts.add_parser(name, help=helptext, description=helptext + ".")
        a.add_argument("model", metavar="MODEL", help="a diffusion run folder or checkpoint")
        add_config_file(a)
        add_fields(a, SamplingConfig, title="sampling")
        if name == "export":
            add_fields(a, ExportConfig, title="export")
            add_alias(a, "--out", ExportConfig, "out_dir")
        else:
            add_fields(a, OutputConfig, title="images")
        if name == "sample":
            a.add_argument("--evaluate", action="store_true",
                           help="score digit samples: intended-class accuracy and Fréchet distance")  # fmt: skip
        if name == "inpaint":
            add_fields(a, InpaintConfig, title="inpainting")
        if name == "edit":
            add_fields(a, EditConfig, title="editing")
        if name == "upscale":
            add_fields(a, UpscaleConfig, title="upscaling")
        a.set_defaults(func=_run)


def _train(args: argparse.Namespace) -> int:
    from lamina.config import from_dict
    from lamina.diffusion.training import train_diffusion
    from lamina.train.distributed import keep_freed_memory_on_cpu

    sections = _sections()
    data = merged(args, sections)
    cfgs: dict[str, Any] = {
        name: from_dict(cls, data.get(name) or {}, name) for name, cls in sections.items()
    }
    if args.print_config:
        from dataclasses import asdict

        print_config({k: asdict(v) for k, v in cfgs.items()})
        return 0
    keep_freed_memory_on_cpu(cfgs["train"].device)  # a CPU run owns this process: keep what steps free
    _, result = train_diffusion(cfgs["unet"], cfgs["noise"], cfgs["images"], cfgs["train"], cfgs["diffusion"],
                                resume=args.resume, overwrite=args.overwrite)  # fmt: skip
    if result.is_main:  # under torchrun, rank 0 alone
        print(result.summary())
    return 0


def _run(args: argparse.Namespace) -> int:
    from lamina.diffusion import files
    from lamina.fields import build

    sampling = build(files.SamplingConfig, values(args, files.SamplingConfig))
    if args.action == "export":
        export = build(files.ExportConfig, values(args, files.ExportConfig))
        paths = files.export_images(args.model, sampling, export.num_images, export.out_dir)
        print(f"wrote {len(paths)} images to {export.out_dir}")
        return 0
    out = build(files.OutputConfig, values(args, files.OutputConfig))
    if args.action == "sample":
        path, images, line = files.sample_grid(args.model, sampling, out, evaluate=args.evaluate)
        print(f"wrote {len(images)} samples to {path}" + (f"; {line}" if line else ""))
    elif args.action == "inpaint":
        path, images = files.inpaint_grid(
            args.model, sampling, out, build(files.InpaintConfig, values(args, files.InpaintConfig))
        )
        print(f"inpainted {len(images)} images -> {path}")
    elif args.action == "upscale":
        up = build(files.UpscaleConfig, values(args, files.UpscaleConfig))
        if up.evaluate or out.input == "held_out":
            path, images, line = files.upscale_grid(args.model, sampling, out)
            print(f"upscaled {len(images)} images -> {path}; {line}")
        else:
            paths = files.upscale_images(args.model, sampling, out.input, out.out, up.overlap)
            print(
                f"upscaled {len(paths)} image{'s' * (len(paths) != 1)} -> {paths[0] if len(paths) == 1 else out.out}"
            )
    else:
        strength = build(files.EditConfig, values(args, files.EditConfig)).strength
        path, images = files.edit_grid(args.model, sampling, out, strength)
        print(f"edited {len(images)} images (strength {strength}) -> {path}")
    return 0

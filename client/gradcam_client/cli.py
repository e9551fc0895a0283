"""`gradcam`: the command line over the SDK.

    gradcam explain IMAGE --server HOST:PORT --model NAME [--method M] [--layer TENSOR]
                  [--target-class C | --top-k K] [-o OVERLAY.png] [--save-npy MAP.npy]
    gradcam explain FOLDER_OR_IMAGES... --model NAME -o OUT_FOLDER [--save-npy NPY_FOLDER]
    gradcam models [--server HOST:PORT]
    gradcam health [--server HOST:PORT] [--wait SECONDS]

One image: ``-o`` is the overlay file (the image's pixel size; the format follows the suffix)
and ``--save-npy`` the raw heatmap, float32 [height, width] ([K, height, width] with
``--top-k K`` above 1). A folder or several images: ``-o`` and ``--save-npy`` are folders that
receive ``<image name>.png`` and ``<image name>.npy``, a progress bar is drawn on stderr, and a
summary closes the run; an image that cannot be read or explained is reported and skipped.
Without ``-o`` the top predictions are printed only.

The server defaults to $GRADCAM_SERVER or 127.0.0.1:8001 and the token to $GRADCAM_TOKEN.
Exit status: 0 on success, 1 when something failed (one line on stderr says what), 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .client import METHODS, Explanation, GradCamClient
from .errors import GradCamError, InvalidInputError, ModelNotFoundError
from .overlay import COLORMAPS

PROG = "gradcam"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PROGRESS_WIDTH = 24
_IMAGE_PREFIX = re.compile(r"^image \d+: ")


class CommandError(Exception):
    """A failure worth one line to the user."""


class ImageError(CommandError):
    """One image could not be read or explained; with several, the others go on."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _client(args) as client:
            return args.run(client, args)
    except OSError as error:
        _fail(_os_message(error))
    except (CommandError, GradCamError, ValueError) as error:  # ValueError: options refused
        _fail(str(error))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 1


# --- commands -------------------------------------------------------------------------------


def _explain(client: GradCamClient, args: argparse.Namespace) -> int:
    if not 0.0 <= args.opacity <= 1.0:
        raise CommandError(f"--opacity must be in [0, 1], got {args.opacity:g}")
    if args.mask is not None:
        args.mask = _read_mask(args.mask)
    images, many = _collect(args.images)
    if not many:
        _explain_one(client, args, images[0], args.output, args.save_npy)
        return 0
    for folder in (args.output, args.save_npy):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise CommandError(f"{folder} is not a folder (several images were given)")
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    names = _output_names(images)
    failed = 0
    progress = _Progress(len(images))
    try:
        for done, image in enumerate(images):
            progress.draw(done, image.name)
            overlay = args.output / f"{names[image]}.png" if args.output else None
            heatmap = args.save_npy / f"{names[image]}.npy" if args.save_npy else None
            try:
                _explain_one(client, args, image, overlay, heatmap, quiet=True)
            except (ImageError, OSError) as error:  # this image only; the rest go on
                failed += 1
                reason = str(error) if isinstance(error, ImageError) else _os_message(error)
                progress.note(f"{PROG}: skipped {reason}")
    except BaseException:  # a failure of the whole run: its line goes below the bar
        progress.abandon()
        raise
    progress.finish()
    explained = len(images) - failed
    noun = "image" if explained == 1 else "images"
    print(f"{explained} {noun} explained, {failed} failed")
    return 1 if failed else 0


def _read_mask(path: Path) -> np.ndarray:
    """A region mask from a picture: its non-black pixels, as float32 [h, w] of 0 and 1."""
    try:
        with Image.open(path) as picture:
            return (np.asarray(picture.convert("L")) > 0).astype(np.float32)
    except OSError as error:
        raise CommandError(f"cannot read the mask {path}: {_os_message(error)}") from None


def _explain_one(
    client: GradCamClient,
    args: argparse.Namespace,
    image: Path,
    overlay_path: Path | None,
    heatmap_path: Path | None,
    quiet: bool = False,
) -> None:
    try:
        result = client.explain(
            image, model=args.model, method=args.method, target_class=args.target_class,
            top_k=args.top_k, layer=args.layer, counterfactual=args.counterfactual,
            eigen_smooth=args.eigen_smooth, aug_smooth=args.aug_smooth,
            target_mask=args.mask, output=args.score_output,
        )
    except InvalidInputError as error:
        if _IMAGE_PREFIX.match(error.message):  # about this image, not the whole request
            raise ImageError(f"{image}: {_IMAGE_PREFIX.sub('', error.message)}") from None
        raise
    except ModelNotFoundError as error:
        raise CommandError(f"{error}{_served_models(client)}") from None
    if overlay_path is not None:
        try:
            picture = result.overlay(args.colormap, args.opacity, args.side_by_side)
        except OSError as error:
            raise ImageError(f"{image}: cannot decode the image: {error}") from None
        _save_picture(picture, overlay_path)
    if heatmap_path is not None:
        maps = [h.heatmap for h in result.heatmaps]
        np.save(heatmap_path, maps[0] if len(maps) == 1 else np.stack(maps))
    if not quiet:
        print(_summary_line(image, result, overlay_path))


def _models(client: GradCamClient, args: argparse.Namespace) -> int:
    statuses = client.list_models()
    if not statuses:
        print("no models")
    width = max((len(s.name) for s in statuses), default=0)
    for status in statuses:
        if not status.ready:
            print(f"{status.name:<{width}}  not ready: {status.reason}")
            continue
        info = client.model_info(status.name)
        shape = "[" + ",".join(str(d) for d in info.input_shape) + "]"
        print(
            f"{status.name:<{width}}  ready  input {info.input} {shape}  "
            f"{info.num_classes} classes  layer {info.layer}"
        )
    return 0


def _health(client: GradCamClient, args: argparse.Namespace) -> int:
    if args.wait:
        client.wait_until_ready(args.wait, args.service)
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


# --- helpers --------------------------------------------------------------------------------


def _collect(arguments: list[Path]) -> tuple[list[Path], bool]:
    """The image files to explain, and whether there are several (a folder counts as several)."""
    images: list[Path] = []
    many = len(arguments) > 1
    for argument in arguments:
        if argument.is_dir():
            many = True
            found = sorted(
                p for p in argument.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise CommandError(
                    f"no images in folder {argument} (looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            images.extend(found)
        elif argument.is_file():
            images.append(argument)
        else:
            raise CommandError(f"no such image file or folder: {argument}")
    return images, many


def _output_names(images: list[Path]) -> dict[Path, str]:
    """``cat`` for cat.jpg; the whole file name where two images share a stem."""
    stems: dict[str, int] = {}
    for image in images:
        stems[image.stem] = stems.get(image.stem, 0) + 1
    return {image: image.stem if stems[image.stem] == 1 else image.name for image in images}


def _save_picture(picture: Image.Image, path: Path) -> None:
    try:
        picture.save(path)
    except ValueError as error:  # Pillow: unknown file extension
        raise CommandError(f"cannot write {path}: {error}") from None


def _summary_line(image: Path, result: Explanation, overlay_path: Path | None) -> str:
    """``photo.jpg: Egyptian cat (0.81) -> overlay.png``, naming the explained class where it
    is not the top one."""
    top = result.predictions[0] if result.predictions else None
    line = f"{image}: {top.label or top.class_index} ({top.score:.2f})" if top else f"{image}:"
    explained = result.heatmaps[0]
    if top is None or explained.class_index != top.class_index:
        line += f"; heatmap of {explained.label or explained.class_index}"
    if overlay_path is not None:
        line += f" -> {overlay_path}"
    return line


def _served_models(client: GradCamClient) -> str:
    try:
        names = [s.name for s in client.list_models()]
    except GradCamError:
        return ""
    return f"; served: {', '.join(names)}" if names else "; the server has no models"


def _os_message(error: OSError) -> str:
    """``photo.jpg: Permission denied``."""
    return f"{error.filename}: {error.strerror}" if error.filename else str(error)


def _fail(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


class _Progress:
    """``[#######.........]  3/10  name`` on one stderr line, redrawn with carriage returns."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._width = 0

    def draw(self, done: int, name: str) -> None:
        filled = PROGRESS_WIDTH * done // self.total
        bar = "#" * filled + "." * (PROGRESS_WIDTH - filled)
        self._write(f"[{bar}] {done}/{self.total} {name}")

    def note(self, line: str) -> None:
        """A line of its own above the bar."""
        self._write(line)
        sys.stderr.write("\n")
        self._width = 0

    def abandon(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()

    def finish(self) -> None:
        self._write(f"[{'#' * PROGRESS_WIDTH}] {self.total}/{self.total}")
        sys.stderr.write("\n")
        sys.stderr.flush()

    def _write(self, text: str) -> None:
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)


# --- arguments ------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> GradCamClient:
    return GradCamClient(
        args.server,
        timeout=args.timeout,
        retries=args.retries,
        token=args.token,
        tls=args.tls or None,
        root_certificates=args.root_cert,
        client_certificate=args.client_cert,
        client_key=args.client_key,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Grad-CAM heatmaps from a gradcam server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument("--server", default=os.environ.get("GRADCAM_SERVER", "127.0.0.1:8001"),
                       metavar="HOST:PORT",
                       help="the server (default: $GRADCAM_SERVER or 127.0.0.1:8001)")
    group.add_argument("--token", default=os.environ.get("GRADCAM_TOKEN"),
                       help="bearer token (default: $GRADCAM_TOKEN)")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--root-cert", type=Path, metavar="PEM",
                       help="CA certificate to verify the server with (implies --tls)")
    group.add_argument("--client-cert", type=Path, metavar="PEM",
                       help="client certificate, for mutual TLS")
    group.add_argument("--client-key", type=Path, metavar="PEM",
                       help="client private key, for mutual TLS")
    group.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="deadline of each call (default 30)")
    group.add_argument("--retries", type=int, default=3,
                       help="retries while the server is unavailable (default 3)")

    explain = commands.add_parser(
        "explain", parents=[connection], help="explain images, write overlays and heatmaps",
        description="Explain one image, several, or the images of a folder.",
    )
    explain.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                         help="an image file, several, or a folder of images")
    explain.add_argument("--model", required=True, help="the model's name on the server")
    explain.add_argument("--method", choices=METHODS, metavar="METHOD",
                         help=f"{', '.join(METHODS)} (default: the model's)")
    target = explain.add_mutually_exclusive_group()
    target.add_argument("--target-class", type=int, metavar="C",
                        help="explain this class index (default: the top-1 class)")
    target.add_argument("--top-k", type=int, metavar="K",
                        help="explain the K highest-scoring classes")
    explain.add_argument("--layer", metavar="TENSOR",
                         help="target layer, a tensor name of the graph (default: the model's)")
    explain.add_argument("--counterfactual", action="store_true",
                         help="explain the negated score: what speaks against the class")
    explain.add_argument("--aug-smooth", action="store_true",
                         help="average the maps of flipped and rescaled copies of the image")
    explain.add_argument("--eigen-smooth", action="store_true",
                         help="project the channel contributions on their first principal "
                              "component instead of summing them")
    explain.add_argument("--mask", type=Path, metavar="PICTURE",
                         help="segmentation models: explain the class over this region, the "
                              "picture's non-black pixels (default: its predicted region)")
    explain.add_argument("--score-output", metavar="NAME",
                         help="the graph output explained (default: the model's)")
    explain.add_argument("-o", "--output", type=Path, metavar="PATH",
                         help="overlay file (one image) or folder (several)")
    explain.add_argument("--save-npy", type=Path, metavar="PATH",
                         help="raw float32 heatmap file (one image) or folder (several)")
    explain.add_argument("--colormap", choices=COLORMAPS, default="jet",
                         help="heatmap colours (default jet)")
    explain.add_argument("--opacity", type=float, default=0.5,
                         help="heatmap opacity over the image, 0..1 (default 0.5)")
    explain.add_argument("--side-by-side", action="store_true",
                         help="image and overlay side by side, captioned with the top predictions")
    explain.set_defaults(run=_explain)

    models = commands.add_parser("models", parents=[connection], help="list the served models")
    models.set_defaults(run=_models)

    health = commands.add_parser("health", parents=[connection],
                                 help="print the server's health; exit 0 only when SERVING")
    health.add_argument("--service", default="", help="a gRPC service name (default: the server)")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for SERVING")
    health.set_defaults(run=_health)
    return parser


if __name__ == "__main__":
    sys.exit(main())

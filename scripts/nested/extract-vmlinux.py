#!/usr/bin/env python3
"""Extracts the uncompressed ELF kernel from a bzImage, if it has a PVH entry note.

usage: extract-vmlinux.py BZIMAGE OUT; exit status 0 when OUT was written, 1 otherwise.
QEMU boots such an ELF through its PVH entry, skipping the kernel's self-decompression (about 8 s
under QEMU's emulator).
"""
import lzma
import struct
import subprocess
import sys
import zlib


def xz(rest):
    return lzma.LZMADecompressor().decompress(rest)


def gz(rest):
    return zlib.decompressobj(31).decompress(rest)


def zst(rest):
    return subprocess.run(["zstd", "-qdc"], input=rest, capture_output=True, check=False).stdout


def has_pvh_note(elf):
    # An ELF note: namesz=4, descsz=4 or 8, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), name "Xen\0".
    return any(struct.pack("<III", 4, n, 18) + b"Xen\0" in elf for n in (4, 8))


def main():
    data = open(sys.argv[1], "rb").read()
    for magic, unpack in ((b"\xfd7zXZ\x00", xz), (b"\x1f\x8b\x08", gz), (b"\x28\xb5\x2f\xfd", zst)):
        at = data.find(magic)
        while at >= 0:
            try:
                elf = unpack(data[at:])
            except (lzma.LZMAError, zlib.error, OSError):
                elf = b""
            if elf[:4] == b"\x7fELF" and has_pvh_note(elf):
                with open(sys.argv[2], "wb") as out:
                    out.write(elf)
                return 0
            at = data.find(magic, at + 1)
    return 1


if __name__ == "__main__":
    sys.exit(main())

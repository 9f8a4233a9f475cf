"""Build the initramfs of the mftvm test guest.

The guest is a stock distribution kernel plus a tiny initramfs: busybox,
the virtio modules the kernel builds as modules, the static ``guestd``
workload program (compiled here from ``guest/guestd.c``) and ``/init``
(``guest/init``).  No root, no loop devices: the cpio archive (``newc``
format) is written in Python, which also lets it carry ``/dev/console``.

Images are cached in ``out_dir`` under a name derived from a hash of all
inputs, so repeated calls are cheap and a changed input yields a new file.

Usage: ``python -m mftvm_openstack.images.builder OUT_DIR``
"""

import dataclasses
import glob
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile

# Bump when the archive layout changes in a way the other inputs don't show.
BUILDER_VERSION = "1"

GUEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest")
GUESTD_SOURCE = os.path.join(GUEST_DIR, "guestd.c")
INIT_SCRIPT = os.path.join(GUEST_DIR, "init")

# Built as modules (=m) by Debian's cloud kernel; their dependencies
# (virtio, virtio_ring, failover, ...) are resolved from modules.dep.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")


class ImageError(Exception):
    """The guest image cannot be built; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A bootable guest: pass as ``-kernel kernel -initrd initrd``."""

    kernel: str
    initrd: str


def find_kernel() -> str:
    """Return the newest cloud kernel in /boot, else the newest kernel."""
    for pattern in ("/boot/vmlinuz-*-cloud-amd64", "/boot/vmlinuz-*"):
        kernels = sorted(glob.glob(pattern), key=_version_key)
        if kernels:
            return kernels[-1]
    raise ImageError(
        "no kernel in /boot: apt-get install linux-image-cloud-amd64")


def build_guest_image(out_dir: str, kernel: str | None = None) -> GuestImage:
    """Build (or reuse) the guest initramfs in ``out_dir``.

    :param kernel: kernel image to pair with; default :func:`find_kernel`.
        Its modules are taken from ``/lib/modules/<version>``.
    """
    kernel = os.path.abspath(kernel or find_kernel())
    version = kernel_version(kernel)
    busybox = _find_busybox()
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageError(
            "gcc not found: apt-get install gcc libc6-dev")
    modules = _module_paths(version)

    key = hashlib.sha256()
    for part in (BUILDER_VERSION, version, busybox,
                 str(os.stat(busybox).st_mtime_ns)):
        key.update(part.encode() + b"\0")
    for path in (GUESTD_SOURCE, INIT_SCRIPT):
        with open(path, "rb") as f:
            key.update(f.read())
    name = f"mftvm-guest-{key.hexdigest()[:16]}.cpio.gz"
    initrd = os.path.join(out_dir, name)
    if os.path.exists(initrd):
        return GuestImage(kernel, initrd)

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        guestd = os.path.join(tmp, "guestd")
        compile_guestd(guestd, gcc)
        archive = _build_archive(busybox, guestd, modules)
        staged = os.path.join(tmp, "initrd.cpio.gz")
        with open(staged, "wb") as f:
            # mtime=0: the same inputs give the same bytes.
            f.write(gzip.compress(archive, compresslevel=6, mtime=0))
        os.replace(staged, initrd)
    return GuestImage(kernel, initrd)


def compile_guestd(out_path: str, gcc: str = "gcc") -> str:
    """Compile ``guest/guestd.c`` statically to ``out_path``.

    Also used by tests to run guestd natively on the host.
    """
    cmd = [gcc, "-O2", "-static", "-Wall", "-o", out_path, GUESTD_SOURCE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageError(
            "gcc not found: apt-get install gcc libc6-dev") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ImageError(
            f"compiling guestd failed ({last}); static linking needs "
            "libc6-dev: apt-get install gcc libc6-dev")
    return out_path


def kernel_version(kernel: str) -> str:
    """Kernel release of a bzImage (``uname -r`` inside the guest)."""
    name = os.path.basename(kernel)
    if name.startswith("vmlinuz-"):
        return name[len("vmlinuz-"):]
    # The x86 boot header points at the version string (boot protocol 2.0+).
    try:
        with open(kernel, "rb") as f:
            header = f.read(0x210)
            (offset,) = struct.unpack_from("<H", header, 0x20E)
            f.seek(offset + 0x200)
            return f.read(256).split(b" ")[0].decode()
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise ImageError(
            f"cannot read the version of kernel {kernel}: {exc}") from exc


def _version_key(path: str) -> list:
    """Sort key that orders 6.1.0-10 after 6.1.0-9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _find_busybox() -> str:
    """Path of a statically linked busybox (dynamic ones won't run alone)."""
    for path in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if path and os.path.exists(path) and _is_static_elf(path):
            return os.path.realpath(path)
    raise ImageError(
        "no statically linked busybox: apt-get install busybox-static")


def _is_static_elf(path: str) -> bool:
    """True if the 64-bit ELF at path has no PT_INTERP (dynamic loader)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if ident[:5] != b"\x7fELF\x02":
            return False
        phoff, = struct.unpack_from("<Q", ident, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ident, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp
               for i in range(phnum))


def _module_paths(version: str) -> list[str]:
    """Paths of GUEST_MODULES and their dependencies, in load order."""
    root = f"/lib/modules/{version}"
    dep_file = os.path.join(root, "modules.dep")
    try:
        with open(dep_file) as f:
            lines = f.read().splitlines()
    except OSError:
        raise ImageError(
            f"{dep_file} missing: install the modules of kernel {version} "
            "(apt-get install linux-image-cloud-amd64)") from None
    deps = {}
    by_name = {}
    for line in lines:
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod

    order = []

    def visit(mod):
        if mod in order:
            return
        for dep in deps.get(mod, ()):
            visit(dep)
        order.append(mod)

    for name in GUEST_MODULES:
        if name not in by_name:
            # Built into this kernel (=y): nothing to load.
            continue
        visit(by_name[name])
    return [os.path.join(root, mod) for mod in order]


def _module_name(path: str) -> str:
    """'kernel/drivers/block/virtio_blk.ko.xz' -> 'virtio_blk'."""
    return os.path.basename(path).split(".ko")[0]


def _read_module(path: str) -> bytes:
    """Module bytes, decompressed: busybox insmod takes plain .ko only."""
    if path.endswith(".ko"):
        with open(path, "rb") as f:
            return f.read()
    if path.endswith(".ko.xz"):
        import lzma
        with lzma.open(path) as f:
            return f.read()
    if path.endswith(".ko.gz"):
        with gzip.open(path) as f:
            return f.read()
    if path.endswith(".ko.zst"):
        try:
            return subprocess.run(["zstd", "-dc", path], check=True,
                                  capture_output=True).stdout
        except (OSError, subprocess.CalledProcessError):
            raise ImageError(
                f"cannot decompress {path}: apt-get install zstd") from None
    raise ImageError(f"unknown kernel module format: {path}")


def _busybox_applets(busybox: str) -> list[str]:
    """Applet paths (e.g. 'usr/bin/awk') to symlink to /bin/busybox."""
    out = subprocess.run([busybox, "--list-full"], check=True,
                         capture_output=True, text=True).stdout
    return [line.strip("/") for line in out.split() if line.strip("/")]


def _build_archive(busybox: str, guestd: str, modules: list[str]) -> bytes:
    cpio = NewcWriter()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc",
              "sys", "tmp", "etc", "root", "lib", "lib/modules"):
        cpio.add_dir(d)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    cpio.add_node("dev/console", stat.S_IFCHR | 0o600, 5, 1)
    with open(busybox, "rb") as f:
        cpio.add_file("bin/busybox", f.read(), 0o755)
    for applet in _busybox_applets(busybox):
        if applet != "bin/busybox":
            cpio.add_symlink(applet, "/bin/busybox")
    with open(guestd, "rb") as f:
        cpio.add_file("bin/guestd", f.read(), 0o755)
    with open(INIT_SCRIPT, "rb") as f:
        cpio.add_file("init", f.read(), 0o755)
    names = []
    for path in modules:
        name = _module_name(path)
        names.append(name)
        cpio.add_file(f"lib/modules/{name}.ko", _read_module(path), 0o644)
    cpio.add_file("etc/mftvm-modules", ("\n".join(names) + "\n").encode(),
                  0o644)
    return cpio.finish()


class NewcWriter:
    """Minimal writer of the cpio 'newc' format the kernel unpacks.

    Each entry is a 110-byte ASCII header of 13 hex fields, the NUL-ended
    name, then the data; name and data are each padded to 4 bytes.  All
    entries are owned by root with mtime 0 (reproducible archives).
    """

    def __init__(self):
        self._buf = io.BytesIO()
        self._ino = 1

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def add_file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_node(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", ino=0, nlink=1)
        return self._buf.getvalue()

    def _entry(self, name, mode, data, nlink=1, rdev=(0, 0), ino=None):
        if ino is None:
            ino, self._ino = self._ino, self._ino + 1
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._write_padded(header + encoded)
        self._write_padded(data)

    def _write_padded(self, chunk):
        self._buf.write(chunk)
        self._buf.write(b"\0" * (-len(chunk) % 4))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mftvm_openstack.images.builder OUT_DIR",
              file=sys.stderr)
        return 2
    try:
        image = build_guest_image(argv[0])
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel}")
    print(f"initrd {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

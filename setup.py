"""The C read path of the mount (deidfs/mount/_fastread.c), built with the package.

Optional: without a C compiler or libfuse3's headers the package installs without it, and
the mount serves every read through Python (the daemon logs which path it uses).
"""

import subprocess

from setuptools import Extension, setup


def _fuse_include_dirs() -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", "--cflags-only-I", "fuse3"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"]
    return [flag[2:] for flag in out.split() if flag.startswith("-I")] or ["/usr/include/fuse3"]


setup(
    ext_modules=[
        Extension(
            "deidfs.mount._fastread",
            sources=["daemon/deidfs/mount/_fastread.c"],
            include_dirs=_fuse_include_dirs(),
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)

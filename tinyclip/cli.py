"""The ``tinyclip`` command line (also ``python -m tinyclip``).

One argparse parser with a subcommand per job. Today there is ``info``,
which reports the installation and the devices it can see; ``train``,
``eval``, ``zeroshot`` and ``embed`` join it as the parts of tinyclip they
drive are written (DESIGN.md, section 6). ``main`` returns an exit code
instead of exiting, so that tests and other Python code can call it.
"""

import argparse
import os
import platform
import sys

import numpy

from . import __version__, backend


def _cpu_count():
    """CPUs this process may run on (the affinity mask where the OS has one), and all the machine has."""
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        usable = total
    return usable, total


def _gpu_description():
    """'yes (count; name)' when CuPy sees a CUDA device, else 'no (why)'."""
    try:
        cupy = backend.cupy_module()
    except RuntimeError as error:
        return f"no ({error})"
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = properties["name"]
    name = name.decode() if isinstance(name, bytes) else name
    count = cupy.cuda.runtime.getDeviceCount()
    return f"yes ({count} device{'s' if count != 1 else ''}; using {name})"


def run_info(args):
    """Print what tinyclip runs on: versions, the default backend, GPU and CPUs."""
    status = 0
    print(f"tinyclip  {__version__}")
    print(f"python    {platform.python_version()} ({platform.python_implementation()}, {sys.executable})")
    print(f"numpy     {numpy.__version__}")
    try:
        default = backend.default_backend()
    except ValueError as error:  # a bad TINYCLIP_BACKEND: say so, but still report the rest
        print(f"backend   invalid: {error}")
        status = 1
    else:
        source = "TINYCLIP_BACKEND" if os.environ.get("TINYCLIP_BACKEND", "").strip() else "built-in default"
        print(f"backend   {default} (from {source})")
    print(f"gpu       {_gpu_description()}")
    usable, total = _cpu_count()
    print(f"cpus      {usable} usable of {total}")
    return status


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tinyclip",
        description="CLIP and SigLIP from scratch on NumPy (CPU) and CuPy (GPU).")
    parser.add_argument("--version", action="version", version=f"tinyclip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser("info", help="show versions, the default backend, GPU and CPUs",
                               description="Show the tinyclip and Python versions, the default backend, "
                                           "whether a GPU is usable, and the CPU count.")
    info.set_defaults(run=run_info)
    return parser


def main(argv=None):
    """Run the command line on ``argv`` (default: sys.argv[1:]) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors: argparse has already printed
        return int(stop.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)

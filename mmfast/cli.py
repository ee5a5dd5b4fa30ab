"""The ``mmfast`` command line: ``mmfast info [--json]`` (more subcommands arrive with training)."""

from __future__ import annotations

import argparse
import json
import sys


def _print_info(info: dict) -> None:
    v, ext = info["versions"], info["extension"]
    print("mmfast", v["mmfast"], "| python", v["python"], "| torch", v["torch"], "| CUDA", v["torch_cuda"],
          "| triton", v["triton"])
    print("GPU:", v["gpu"] or "none", "| TRITON_INTERPRET:", v["triton_interpret"])
    if ext["built"] and ext["loaded"]:
        cuda = f"CUDA sources for {', '.join(ext['archs'])}" if ext["cuda_sources"] else f"no CUDA sources ({ext['why_not']})"
        print(f"extension mmfast._C: built and loaded; {cuda}")
    else:
        print(f"extension mmfast._C: not available ({ext['why_not']})")
    print("default backend:", info["default_backend"])
    print()
    print(f"{'op':<22} {'backend':<8} status")
    for op, entry in info["ops"].items():
        for i, (b, status) in enumerate(entry["backends"].items()):
            print(f"{op if i == 0 else '':<22} {b:<8} {status}")
        print(f"{'':<22} {'auto':<8} " + ", ".join(f"{k} -> {b}" for k, b in entry["auto"].items()))
    print("\n'compiled' = built here but never run on a GPU by our tests; 'verified' = passed the GPU tests"
          " (mmfast/kernel_table.json, written from benchmark runs).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, compiled extension, backends per op")
    p_info.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.command == "info":
        import mmfast

        info = mmfast.backends()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_info(info)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

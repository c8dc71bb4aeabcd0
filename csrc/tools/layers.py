#!/usr/bin/env python3
"""Check that csrc's files call each other downwards only.

Each csrc/*.c file names its floor in its opening comment ("Layer N"), lower
numbers below.  From the compiled objects (`nm`), each file's undefined pm_
symbols are matched to the file that defines them; that gives the call graph
between files, which this prints.  It fails (exit 1) when a file calls a file
on its own floor or above it, when the graph has a cycle, or when a file
states no layer.

    python3 csrc/tools/layers.py [BUILD_DIR]      (default csrc/build)
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1]
LAYER = re.compile(r"\bLayer (\d+)\b")


def layer_of(src: Path) -> int | None:
    """The N of "Layer N" in the file's opening comment."""
    text = src.read_text(errors="replace")
    m = re.match(r"\s*/\*(.*?)\*/", text, re.S)
    found = LAYER.search(m.group(1)) if m else None
    return int(found.group(1)) if found else None


def symbols(obj: Path) -> tuple[set[str], set[str]]:
    """(defined, undefined) pm_ symbols of an object file."""
    out = subprocess.run(["nm", "--defined-only", "-g", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    defined = {ln.split()[-1] for ln in out.splitlines() if ln.split() and ln.split()[-1].startswith("pm_")}
    out = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
    undefined = {ln.split()[-1] for ln in out.splitlines() if ln.split() and ln.split()[-1].startswith("pm_")}
    return defined, undefined


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def main(argv: list[str]) -> int:
    build = Path(argv[1]) if len(argv) > 1 else CSRC / "build"
    sources = sorted(CSRC.glob("*.c"))
    problems: list[str] = []
    layers: dict[str, int] = {}
    owner: dict[str, str] = {}
    uses: dict[str, set[str]] = {}
    for src in sources:
        obj = build / (src.stem + ".o")
        if not obj.exists():
            problems.append(f"{obj} is missing: build the objects first (make -C csrc)")
            continue
        n = layer_of(src)
        if n is None:
            problems.append(f"{src.name}: its opening comment states no layer (\"Layer N\")")
            n = -1
        layers[src.name] = n
        defined, undefined = symbols(obj)
        for sym in defined:
            owner[sym] = src.name
        uses[src.name] = undefined
    graph: dict[str, set[str]] = {name: set() for name in uses}
    why: dict[tuple[str, str], list[str]] = {}
    for name, undefined in uses.items():
        for sym in sorted(undefined):
            callee = owner.get(sym)
            if callee is None or callee == name:
                continue
            graph[name].add(callee)
            why.setdefault((name, callee), []).append(sym)
    print("csrc call graph (file [layer] -> files it calls):")
    for name in sorted(graph, key=lambda x: (-layers.get(x, -1), x)):
        callees = ", ".join(f"{c} [{layers.get(c)}]" for c in sorted(graph[name], key=lambda c: -layers.get(c, -1)))
        print(f"  {name} [{layers.get(name)}] -> {callees or '(nothing)'}")
    for (a, b), syms in sorted(why.items()):
        if layers.get(b, -1) >= layers.get(a, -1) >= 0:
            problems.append(f"{a} (layer {layers[a]}) calls {b} (layer {layers[b]}), not below it: "
                            f"{', '.join(syms[:6])}")
    cycle = find_cycle(graph)
    if cycle:
        problems.append("cycle: " + " -> ".join(cycle))
    if problems:
        print("\nLAYER CHECK FAILED:")
        for p in problems:
            print("  " + p)
        return 1
    print("\nlayers ok: every call goes downwards, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

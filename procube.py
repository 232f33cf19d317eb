"""procube: the command line. Thin by design: it parses arguments and calls hw/, sim/,
golden/ and fpga/.

Bad arguments exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import time
from pathlib import Path

__version__ = "0.1.0"

# Plug-in subcommands: name → (module, one-line help). A plug-in module exposes HELP,
# add_arguments(parser) and run(args) -> int; it is imported only when chosen.
PLUGINS = {
    "bench": {
        "cubist": ("sim.bench_cubist", "merge unit cycles per frame vs the input bound"),
        "procrustes": ("sim.bench_procrustes", "Procrustes RTL sparse speedup vs density"),
        "cubist-golden": ("golden.bench_cubist", "CubistMerge golden merge vs ToMe, CPU time"),
        "dropback": ("golden.bench_dropback", "Dropback optimizer step vs SGD, CPU time"),
        "fmax": ("fpga.ooc", "out-of-context fmax and resources of one design (nextpnr)"),
    },
    "experiment": {
        "cubist": ("golden.experiments.cubist", "tiny ViTs on digits: CubistMerge vs ToMe"),
        "dropback": ("golden.experiments.dropback", "weight-budget training on digits"),
    },
}
# FPGA commands are single plug-ins with their own options.
FPGA_COMMANDS = {
    "build": ("fpga.build", "build a bitstream for a board (YoWASP tools by default)"),
    "program": ("fpga.program", "flash a built bitstream onto a board"),
    "run": ("fpga.run", "run an accelerator on a board over its UART host link"),
}


class UsageError(Exception):
    """A bad command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


def _load_plugin(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise UsageError(
                f"procube: {what} is not available yet ({module} does not exist)") from None
        raise


def _add_design_params(parser, design) -> None:
    for p in design.params:
        kw = {"type": p.type, "default": p.default, "help": f"{p.help} (default: {p.default})"}
        if p.choices:
            kw["choices"] = p.choices
        parser.add_argument(f"--{p.name.replace('_', '-')}", dest=p.name, **kw)


def _design_params(args, design) -> dict:
    return {p.name: getattr(args, p.name) for p in design.params}


def _build_parser() -> argparse.ArgumentParser:
    from hw import designs

    parser = _Parser(prog="procube", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"procube {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    def per_design(cmd: str, helptext: str, description: str, add_options) -> None:
        p = sub.add_parser(cmd, help=helptext, description=description)
        dsub = p.add_subparsers(dest="design", metavar="DESIGN", required=True,
                                parser_class=_Parser)
        for d in designs.DESIGNS.values():
            dp = dsub.add_parser(d.name, help=d.summary, description=d.summary)
            _add_design_params(dp, d)
            add_options(dp)

    def verilog_options(dp) -> None:
        dp.add_argument("-o", "--out", type=Path, default=Path("out/verilog"),
                        help="output directory (default: out/verilog)")
        dp.add_argument("--top", default=None, help="Verilog module name (default: the design)")

    def sim_options(dp) -> None:
        dp.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator",
                        help="simulator (default: verilator)")
        dp.add_argument("--waves", action="store_true", help="write a waveform (VCD/FST)")
        dp.add_argument("--seed", type=int, default=None, help="testbench random seed")
        dp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a testbench parameter (JSON value), repeatable")

    per_design("verilog", "write a design's Verilog and a JSON manifest",
               "Write a design's Verilog and a JSON manifest of its parameters and ports.",
               verilog_options)
    per_design("sim", "run a design's cocotb testbench",
               "Generate a design's Verilog and run its cocotb testbench, checked against "
               "the golden model.", sim_options)

    for cmd, table in PLUGINS.items():
        names = ", ".join(table)
        lines = "\n".join(f"  {n:14s} {h}" for n, (_, h) in table.items())
        plural = {"bench": "benchmarks", "experiment": "experiments"}[cmd]
        p = sub.add_parser(cmd, help=f"{plural}: {names}",
                           description=f"Run a {cmd}. `procube {cmd} NAME --help` shows the "
                                       f"options of one.\n\n{lines}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("name", choices=list(table), metavar="NAME", help=names)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    for cmd, (_, helptext) in FPGA_COMMANDS.items():
        p = sub.add_parser(cmd, help=helptext, description=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    p = sub.add_parser("demo", help="the main job: generate, co-simulate, report",
                       description="Generate the Verilog of the default configurations, "
                                   "co-simulate them against the golden models, print a report.")
    p.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator")
    p.add_argument("-o", "--out", type=Path, default=Path("out/demo"))
    return parser


def _cmd_verilog(args) -> int:
    from hw import designs
    from sim.runner import to_verilog

    design = designs.get(args.design)
    params = _design_params(args, design)
    top = args.top or design.name
    comp = _build_design(design, params)
    text = to_verilog(comp, name=top)
    args.out.mkdir(parents=True, exist_ok=True)
    vpath = args.out / f"{top}.v"
    vpath.write_text(text)
    manifest = {
        "design": design.name,
        "top": top,
        "params": params,
        "ports": designs.port_manifest(comp),
        "verilog": vpath.name,
        "verilog_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "generator": f"procube {__version__}",
    }
    mpath = args.out / f"{top}.json"
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {vpath} ({text.count(chr(10))} lines) and {mpath}")
    return 0


def _build_design(design, params):
    from hw.designs import DesignUnavailable

    try:
        return design.build(**params)
    except DesignUnavailable as e:
        raise UsageError(f"procube: {e}") from None


def _parse_sets(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"procube sim: error: --set takes KEY=VALUE, not {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _run_testbench(design_name: str, params: dict, simulator: str, *, overrides=None,
                   seed=None, waves=False):
    from hw import designs
    from sim import designs as tbs
    from sim.runner import simulate

    design = designs.get(design_name)
    tb = tbs.get(design_name)
    comp = _build_design(design, params)
    try:
        importlib.import_module(tb.module)
    except ModuleNotFoundError:
        raise UsageError(f"procube: the {design_name} testbench is not available yet") from None
    tb_params = {**tb.defaults, **params, **(overrides or {})}
    if seed is not None:
        tb_params["seed"] = seed
    return simulate(comp, test_module=tb.module, params=tb_params, simulator=simulator,
                    name=design_name, waves=waves)


def _cmd_sim(args) -> int:
    from hw import designs

    design = designs.get(args.design)
    t0 = time.monotonic()
    result = _run_testbench(design.name, _design_params(args, design), args.simulator,
                            overrides=_parse_sets(args.set), seed=args.seed, waves=args.waves)
    print(f"{design.name} on {args.simulator}: {result.summary()} "
          f"in {time.monotonic() - t0:.1f} s")
    for k, v in sorted(result.metrics.items()):
        print(f"  {k}: {v}")
    if result.waves:
        print(f"  waves: {result.waves}")
    if not result.passed and result.log:
        print(f"  log: {result.log}")
    return 0 if result.passed else 1


def _cmd_plugin(cmd: str, name: str, rest: list[str]) -> int:
    module, helptext = PLUGINS[cmd][name] if cmd in PLUGINS else FPGA_COMMANDS[cmd]
    label = f"{cmd} {name}" if name else cmd
    mod = _load_plugin(module, f"'procube {label}'")
    parser = _Parser(prog=f"procube {label}", description=getattr(mod, "HELP", helptext))
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(rest)) or 0)


def _cmd_demo(args) -> int:
    from hw import designs
    from sim import designs as tbs
    from sim.runner import to_verilog

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"procube demo: default configurations, simulator {args.simulator}")
    failed = 0
    for name in tbs.TESTBENCHES:
        design = designs.get(name)
        params = design.defaults()
        try:
            comp = _build_design(design, params)
        except UsageError as e:
            print(f"  {name:11s} skipped: {str(e).removeprefix('procube: ')}")
            continue
        text = to_verilog(comp, name=name)
        (args.out / f"{name}.v").write_text(text)
        t0 = time.monotonic()
        try:
            result = _run_testbench(name, params, args.simulator)
        except UsageError as e:
            print(f"  {name:11s} {text.count(chr(10)):6d} lines of Verilog; "
                  f"{str(e).removeprefix('procube: ')}")
            continue
        # A short report: the scalar metrics (cycles, ratios, counts), not the records.
        metrics = ", ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}"
                            for k, v in sorted(result.metrics.items())
                            if isinstance(v, (int, float, str)))
        print(f"  {name:11s} {text.count(chr(10)):6d} lines of Verilog; {result.summary()} "
              f"in {time.monotonic() - t0:.1f} s")
        print(f"  {'':11s} {metrics}")
        failed += not result.passed
    print(f"Verilog written to {args.out}/")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from sim.runner import SimulatorUnavailable

    try:
        if argv and argv[0] in FPGA_COMMANDS:
            return _cmd_plugin(argv[0], "", argv[1:])
        if len(argv) >= 2 and argv[0] in PLUGINS and argv[1] in PLUGINS[argv[0]]:
            return _cmd_plugin(argv[0], argv[1], argv[2:])
        args = _build_parser().parse_args(argv)
        if args.command == "verilog":
            return _cmd_verilog(args)
        if args.command == "sim":
            return _cmd_sim(args)
        if args.command == "demo":
            return _cmd_demo(args)
        return _cmd_plugin(args.command, args.name, args.rest)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ValueError, SimulatorUnavailable) as e:
        print(f"procube: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

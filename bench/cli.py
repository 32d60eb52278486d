"""`pdserve bench`: TTFT/TPOT/ITL/E2E, throughput and goodput of a `pdserve serve` under a reproducible workload.

Targets: `--addr HOST:PORT` (a running server), `--launch "<serve flags>"` (starts `pdserve serve --port 0
<flags>`, benchmarks it, stops it with SIGINT) or `--compare "<flags A>" "<flags B>"` (the same workload and
arrival times against A, then B). Registered through the `pdserve.commands` entry point (`commands()`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.arrivals import RateSchedule, arrival_offsets, check_burstiness, check_rate, schedule_offsets
from bench.client import BenchClient, ClientOptions, LaunchedServer, ServerInfo
from bench.faults import FaultSchedule, FaultSpec, fault_impact, is_local
from bench.margins import mismatch_line, mismatches
from bench.multiturn import Conversation, MultiturnSpec, build_conversations, run_conversations
from bench.openai_client import BACKENDS, HttpTarget, OpenAIBenchClient
from bench.pools import PoolSampler, run_points
from bench.report import (
    RunOutcome,
    format_sweep,
    format_table,
    rate_json,
    rate_text,
    same_rate_pairs,
    same_tokens_line,
    write_plots,
    write_results,
)
from bench.slo_grid import SloGrid, compare_line, format_grid
from bench.stats import SLO, RequestRecord, compute_metrics, latency_samples_ms
from bench.workload import (
    DATASETS,
    BenchRequest,
    Workload,
    WorkloadSpec,
    WorkloadSummary,
    build_workload,
    tokenizer_counter,
    tokenizer_text,
)
from llama_relax.errors import UserError

RESULTS_VERSION = 1


@dataclass(frozen=True)
class Target:
    """A server to measure: an address, or serve flags to launch one with."""

    label: str
    addr: str | None = None
    serve_flags: str | None = None


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[Target, ...]
    workload: WorkloadSpec
    client: ClientOptions
    rates: tuple[float, ...]
    burstiness: float = 1.0
    warmup: int = 0
    slo: SLO = dataclasses.field(default_factory=SLO)
    out: Path | None = None
    tokenizer_model: str | None = None
    ready_timeout_s: float = 600.0
    faults: tuple[FaultSpec, ...] = ()
    multiturn: MultiturnSpec | None = None  # --dataset multiturn
    slo_grid: SloGrid | None = None  # --slo-grid
    schedule: RateSchedule | None = None  # --rate-schedule: piecewise rates (one run; labelled by its mean rate)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        openai = args.backend != "grpc"
        for addr in (args.addr, args.compare_addr):
            if addr is None:
                continue
            if openai:
                HttpTarget.parse(addr)
            elif not _looks_like_addr(addr):
                raise ValueError(f"--addr/--compare-addr must be HOST:PORT for --backend grpc, got {addr!r}")
        if args.addr is not None:
            targets = (Target("A" if args.compare_addr else "server", addr=args.addr),)
        elif args.launch is not None:
            targets = (Target("A", serve_flags=args.launch),)
        else:
            targets = (Target("A", serve_flags=args.compare[0]), Target("B", serve_flags=args.compare[1]))
        if args.compare_addr is not None:
            if len(targets) == 2:
                raise ValueError(
                    "--compare-addr is the second side of --launch or --addr, not a third one of --compare"
                )
            targets = (*targets, Target("B", addr=args.compare_addr))
        for t in targets:
            _split_flags(t.serve_flags)
        given = [f for f, v in (("--request-rate", args.request_rate), ("--sweep-rates", args.sweep_rates)) if v]
        given += ["--rate-schedule"] if args.rate_schedule else []
        if len(given) > 1:
            raise ValueError(
                f"give one of --request-rate, --sweep-rates and --rate-schedule, not {' and '.join(given)}"
            )
        schedule = RateSchedule.parse(args.rate_schedule) if args.rate_schedule else None
        if args.sweep_rates is not None:
            rates = tuple(_rate(x) for x in args.sweep_rates.split(",") if x.strip())
            if not rates:
                raise ValueError("--sweep-rates: give at least one rate, e.g. 1,2,4")
        else:
            rates = (math.inf if args.request_rate is None else check_rate(args.request_rate),)
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        if not args.ready_timeout > 0:
            raise ValueError(f"--ready-timeout must be > 0, got {args.ready_timeout}")
        if args.fault and args.addr is not None and not is_local(args.addr):
            raise ValueError("--fault kills a worker process on this machine: the server must be on a loopback address")
        chat = args.dataset == "multiturn"
        input_len = args.input_len or (64 if chat else 128)  # multiturn: a user message, an answer
        output_len = args.output_len or (32 if chat else 64)
        if chat and args.fault:
            raise ValueError("--fault applies to the single-turn datasets only")
        multiturn = None
        if chat:
            multiturn = MultiturnSpec(
                args.conversations, args.turns, args.system_len, input_len, output_len, args.range_ratio, args.seed
            )
        workload = WorkloadSpec(
            dataset=args.dataset,
            num_prompts=args.num_prompts,
            input_len=input_len,
            output_len=output_len,
            range_ratio=args.range_ratio,
            long_fraction=args.long_fraction,
            long_input_len=args.long_input_len,
            dataset_path=args.dataset_path,
            seed=args.seed,
        )
        if workload.dataset_path is not None and not workload.dataset_path.is_file():
            raise FileNotFoundError(f"--dataset-path: no such file: {workload.dataset_path}")
        client = ClientOptions(
            backend=args.backend,
            api_key=args.api_key or os.environ.get("PDSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            request_timeout_s=args.request_timeout,
            max_concurrency=args.max_concurrency,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            progress=not args.no_progress,
        )
        tok_model = (
            None
            if args.dataset not in ("sharegpt", "grounded") and args.backend != "openai-chat"
            else args.model or next((_model_flag(t.serve_flags) for t in targets if t.serve_flags), None)
        )
        return cls(
            targets,
            workload,
            client,
            rates,
            check_burstiness(args.burstiness),
            args.warmup,
            SLO.parse(args.slo),
            args.out,
            tok_model,
            args.ready_timeout,
            tuple(FaultSpec.parse(f) for f in args.fault),
            multiturn,
            SloGrid.parse(args.slo_grid) if args.slo_grid else None,
            schedule,
        )

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["rates"] = [rate_json(r) for r in self.rates]
        return d


def _looks_like_addr(addr: str) -> bool:
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _split_flags(flags: str | None) -> list[str]:
    try:
        return shlex.split(flags or "")
    except ValueError as e:
        raise ValueError(f"serve flags {flags!r}: {e}") from None


def _rate(text: str) -> float:
    try:
        return check_rate(float(text))
    except ValueError:
        raise ValueError(f"request rate must be a positive number or inf, got {text.strip()!r}") from None


def _model_flag(flags: str | None, name: str = "--model") -> str | None:
    """A flag's value in serve flags, if any (`--model`: count text lengths with the served model's tokenizer)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(name, default=None)
    return getattr(p.parse_known_args(_split_flags(flags))[0], name.lstrip("-").replace("-", "_"))


def mismatch_lines(cfg: BenchConfig, runs: Sequence[RunOutcome]) -> list[str]:
    """For two servers at one rate whose greedy tokens differ: where, and at what top-2 margin (`bench.margins`)."""
    if cfg.client.temperature != 0 or len({r.label for r in runs}) != 2:
        return []
    out = []
    for a, b in same_rate_pairs(runs):
        pairs = [(x, y) for x, y in zip(a.output_ids, b.output_ids, strict=False) if x and y]
        if not any(x != y for x, y in pairs) or not any(a.prompt_ids):
            continue
        flags = a.serve_flags or b.serve_flags
        model = cfg.tokenizer_model or _model_flag(flags)
        cache = _model_flag(flags, "--cache-dir")
        from llama_relax.compile import default_cache_dir  # TVM: only when outputs differ

        found = mismatches(
            a.prompt_ids, a.output_ids, b.output_ids, model, Path(cache) if cache else default_cache_dir()
        )
        out.append(f"{mismatch_line(found, len(pairs))} @ {rate_text(a.request_rate)}")
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--addr", help="a running server: HOST:PORT of `pdserve serve` (gRPC), or http://HOST:PORT (--backend openai-*)"
    )
    target.add_argument(
        "--launch",
        metavar="FLAGS",
        help='start `pdserve serve --port 0 FLAGS` for the run (write --launch="--colocated 1")',
    )
    target.add_argument(
        "--compare",
        nargs=2,
        metavar=("FLAGS_A", "FLAGS_B"),
        help="launch A, run, stop; launch B, same requests and arrival times; report B/A",
    )
    p.add_argument(
        "--compare-addr",
        default=None,
        metavar="ADDR",
        help="a running server as side B of --launch or --addr (e.g. llama-server at http://127.0.0.1:8080)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="grpc",
        help="grpc: pdserve's API (default); openai-completions / openai-chat: any OpenAI-compatible server",
    )
    p.add_argument("--api-key", default=None, help="API key (default $PDSERVE_API_KEY, else $OPENAI_API_KEY)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=DATASETS, default="random")
    w.add_argument("--dataset-path", type=Path, default=None, help="ShareGPT JSON file (--dataset sharegpt)")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument(
        "--input-len",
        "--random-input-len",
        dest="input_len",
        type=int,
        default=None,
        help="prompt tokens (default 128); multiturn: each user message (default 64)",
    )
    w.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=int,
        default=None,
        help="output tokens (default 64); multiturn: each answer (default 32)",
    )
    w.add_argument("--conversations", type=int, default=8, help="multiturn: conversations (default 8)")
    w.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation (default 4)")
    w.add_argument("--system-len", type=int, default=256, help="multiturn: shared system prompt tokens (default 256)")
    w.add_argument(
        "--range-ratio",
        "--random-range-ratio",
        dest="range_ratio",
        type=float,
        default=0.0,
        help="random lengths uniform in [len*(1-ratio), len]",
    )
    w.add_argument("--long-fraction", type=float, default=0.0, help="fraction of prompts of --long-input-len")
    w.add_argument("--long-input-len", type=int, default=0)
    w.add_argument("--seed", type=int, default=0, help="fixes the requests and their arrival times")
    w.add_argument(
        "--model",
        default=None,
        help="model whose tokenizer counts ShareGPT lengths (default: --model of the serve flags; "
        "without one: 1.3 tokens per word)",
    )
    w.add_argument("--ignore-eos", action="store_true", help="force every output to its target length")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", type=float, default=None, help="req/s (default inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    a.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests")
    a.add_argument("--sweep-rates", default=None, metavar="R1,R2,...", help="run each rate in turn")
    a.add_argument(
        "--rate-schedule",
        default=None,
        metavar="T:R,...",
        help='piecewise rates over time, e.g. "0:0.2,60:2,120:0.2" (from second T on, R req/s)',
    )
    a.add_argument("--warmup", type=int, default=0, help="uncounted warm-up requests before each server's runs")
    o = p.add_argument_group("measurement and output")
    o.add_argument("--slo", default=None, metavar="ttft=MS,tpot=MS", help="SLOs for goodput (e2e=MS also)")
    o.add_argument(
        "--slo-grid",
        default=None,
        metavar="ttft=MS,..;tpot=MS,..",
        help="SLO attainment over every TTFT x TPOT limit pair (a table per run; a PNG per pair with --out)",
    )
    o.add_argument("--request-timeout", type=float, default=600.0, help="per-request deadline, seconds")
    o.add_argument("--ready-timeout", type=float, default=600.0, help="wait for a launched server, seconds")
    o.add_argument("--out", type=Path, default=None, help="write DIR/results.json and PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="kill|stop:ROLE@S[+HOLD]",
        help="inject a fault into each run, e.g. kill:decode@10s, stop:prefill@5+3 (report adds its impact)",
    )


def _client(cfg: BenchConfig, addr: str) -> BenchClient:
    backend = cfg.client.backend
    if backend == "grpc":
        return BenchClient(addr, cfg.client)
    detokenize = None
    if backend == "openai-chat" and cfg.tokenizer_model:
        detokenize = tokenizer_text(cfg.tokenizer_model)
    return OpenAIBenchClient(addr, cfg.client, backend == "openai-chat", cfg.client.api_key, detokenize)


def _make_workload(cfg: BenchConfig, info: ServerInfo) -> Workload:
    if not info.vocab_size or not info.context_window_size:
        raise UserError(f"{info.model!r}: the server reports no vocabulary size / context length to build the workload")
    if cfg.multiturn is not None:  # what results.json records: each turn's new tokens and its answer length
        convs = build_conversations(cfg.multiturn, info.vocab_size, info.context_window_size)
        return Workload(tuple(_turn_requests(convs)))
    count = None
    if cfg.workload.dataset in ("sharegpt", "grounded"):
        if not info.has_tokenizer:
            raise ValueError(
                f"--dataset {cfg.workload.dataset} sends text prompts; the server's model has no tokenizer"
            )
        count = tokenizer_counter(cfg.tokenizer_model) if cfg.tokenizer_model else None
    return build_workload(cfg.workload, info.vocab_size, info.context_window_size, count)


def _turn_requests(convs: Sequence[Conversation]) -> list[BenchRequest]:
    return [
        BenchRequest(len(u) + (len(c.system) if k == 0 else 0), a, u)
        for c in convs
        for k, (u, a) in enumerate(zip(c.users, c.answer_lens, strict=True))
    ]


WARMUP_SEED_OFFSET = 7919  # warm-up requests come from another seed: a prefix cache must not see the run's prompts


def _warm_up(client: BenchClient, cfg: BenchConfig, workload: Workload, info: ServerInfo, n: int) -> None:
    """`n` uncounted requests like the run's (same lengths) but not the run's own: random/fixed and multiturn
    get fresh random prompts of another seed; sharegpt (text, from a file) repeats its first ones."""
    if cfg.workload.dataset == "sharegpt":
        reqs = [workload.requests[i % len(workload.requests)] for i in range(n)]
    else:
        dataset = "random" if cfg.workload.dataset == "multiturn" else cfg.workload.dataset
        spec = dataclasses.replace(
            cfg.workload, dataset=dataset, num_prompts=n, seed=cfg.workload.seed + WARMUP_SEED_OFFSET
        )
        reqs = list(build_workload(spec, info.vocab_size, info.context_window_size).requests)
    failed = [r for r in client.run(reqs, [0.0] * n, progress=False).records if not r.ok]
    if failed:
        raise UserError(f"{len(failed)}/{n} warm-up requests failed, e.g. {failed[0].error}: {failed[0].error_detail}")


@dataclass(frozen=True)
class ServerRecord:
    """A server measured: where, launched with which flags, what it served, how it exited (None: not ours)."""

    label: str
    addr: str
    serve_flags: str | None
    model: str
    mode: str
    exit_code: int | None


@dataclass(frozen=True)
class BenchResult:
    config: BenchConfig
    workload: WorkloadSummary
    servers: tuple[ServerRecord, ...]
    runs: tuple[RunOutcome, ...]

    def preamble(self, argv: list[str]) -> dict[str, object]:
        """results.json apart from the runs: the exact configuration, seed, command line, requests, servers."""
        return {
            "version": RESULTS_VERSION,
            "seed": self.config.workload.seed,
            "argv": argv,
            "config": self.config.to_json(),
            "workload": dataclasses.asdict(self.workload),
            "servers": [dataclasses.asdict(s) for s in self.servers],
        }


def _measure(
    cfg: BenchConfig, target: Target, stack: contextlib.ExitStack, workload: Workload | None
) -> tuple[Workload, ServerInfo, LaunchedServer | None, list[RunOutcome]]:
    """Connect to (or launch) `target` and run every rate; returns (workload, server record, runs)."""
    launched = None
    addr = target.addr or ""
    if target.serve_flags is not None:
        log = cfg.out / f"server-{target.label}.log" if cfg.out else None
        print(
            f"pdserve bench: launching {target.label}: pdserve serve --port 0 {target.serve_flags}",
            file=sys.stderr,
            flush=True,
        )
        http = cfg.client.backend != "grpc"
        launched = stack.enter_context(LaunchedServer(target.serve_flags, log, cfg.ready_timeout_s, http=http))
        addr = launched.http_url if http else launched.addr
    client = stack.enter_context(_client(cfg, addr))
    info = client.info()
    workload = workload or _make_workload(cfg, info)
    if cfg.warmup:
        _warm_up(client, cfg, workload, info, cfg.warmup)
    runs = []
    if cfg.multiturn is not None:
        convs = build_conversations(cfg.multiturn, info.vocab_size, info.context_window_size)
        for rate in cfg.rates:
            offsets = _offsets(cfg, len(convs), rate)
            result = run_conversations(client, convs, offsets, desc=f"{target.label} @ {rate_text(rate)}")
            runs.append(_outcome(cfg, target, addr, rate, result.records, result.duration_s))
        return workload, info, launched, runs
    for rate in cfg.rates:
        offsets = _offsets(cfg, len(workload.requests), rate)
        rate = len(offsets) / offsets[-1] if cfg.schedule is not None and offsets[-1] > 0 else rate  # its mean
        schedule = FaultSchedule(cfg.faults, client.worker_pid)
        sampler = PoolSampler(client.pool_sizes)

        def started(t0: float, schedule=schedule, sampler=sampler) -> None:
            schedule.start(t0)
            sampler.start(t0)

        result = client.run(workload.requests, offsets, desc=f"{target.label} @ {rate_text(rate)}", on_start=started)
        impacts = tuple(fault_impact(e, result.records, result.start) for e in schedule.join())
        outcome = _outcome(cfg, target, addr, rate, result.records, result.duration_s, impacts)
        sent, gaps = run_points(result.records, result.start)
        pools = sampler.stop()
        runs.append(
            dataclasses.replace(outcome, pools=pools, duration_s=result.duration_s, itl_points=gaps, sent_s=sent)
        )
    return workload, info, launched, runs


def _offsets(cfg: BenchConfig, n: int, rate: float):
    """Send times of `n` requests: at `rate`, or under `--rate-schedule`."""
    if cfg.schedule is not None:
        return schedule_offsets(n, cfg.schedule, cfg.burstiness, cfg.workload.seed)
    return arrival_offsets(n, rate, cfg.burstiness, cfg.workload.seed)


def _outcome(
    cfg: BenchConfig,
    target: Target,
    addr: str,
    rate: float,
    records: Sequence[RequestRecord],
    duration_s: float,
    impacts: tuple = (),
) -> RunOutcome:
    metrics = compute_metrics(records, duration_s, cfg.slo)
    ids = tuple(r.output_ids if r.ok else () for r in records)
    prompts = tuple(r.prompt_ids for r in records)
    grid = cfg.slo_grid.attainment(records) if cfg.slo_grid else ()
    samples = latency_samples_ms(records)
    return RunOutcome(
        target.label, addr, target.serve_flags, rate, metrics, samples, impacts, ids, prompt_ids=prompts, slo_grid=grid
    )


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Every target x rate: the same requests (and, per rate, the same arrival times) against each server."""
    runs: list[RunOutcome] = []
    servers: list[ServerRecord] = []
    workload: Workload | None = None
    first: ServerInfo | None = None
    for target in cfg.targets:
        with contextlib.ExitStack() as stack:  # stops a launched server before the next one starts
            workload, info, launched, target_runs = _measure(cfg, target, stack, workload)
        first = first or info
        if (info.vocab_size, info.context_window_size) != (first.vocab_size, first.context_window_size):
            print(
                f"pdserve bench: warning: {target.label} serves a different model than {cfg.targets[0].label} "
                f"(vocab/context {info.vocab_size}/{info.context_window_size} vs {first.vocab_size}/"
                f"{first.context_window_size})",
                file=sys.stderr,
            )
        exit_code = launched.exit_code if launched else None
        if launched and exit_code != 0:
            print(f"pdserve bench: warning: server {target.label} exited with status {exit_code}", file=sys.stderr)
        servers.append(
            ServerRecord(target.label, target_runs[0].addr, target.serve_flags, info.model, info.mode, exit_code)
        )
        runs.extend(target_runs)
    assert workload is not None
    return BenchResult(cfg, WorkloadSummary.of(workload), tuple(servers), tuple(runs))


def summary(runs: Sequence[RunOutcome], grid: SloGrid | None = None) -> str:
    labels = list(dict.fromkeys(r.label for r in runs))
    rates = list(dict.fromkeys(r.request_rate for r in runs))
    parts = []
    if len(labels) > 1:
        for rate in rates:
            same = [r for r in runs if r.request_rate == rate]
            parts.append(format_table(same, f"pdserve bench: {' vs '.join(labels)} @ {rate_text(rate)}"))
            if len(same) == 2 and (line := same_tokens_line(same[0], same[1])):
                parts.append(line)
    elif len(rates) == 1:
        parts.append(format_table(runs, "pdserve bench"))
    if len(rates) > 1:
        parts.append(format_sweep(runs))
    if grid is not None:
        parts += [format_grid(r.name, grid, r.slo_grid) for r in runs]
        parts += [compare_line(a.name, b.name, a.slo_grid, b.slo_grid) for a, b in same_rate_pairs(runs)]
    return "\n\n".join(parts)


def run(args: argparse.Namespace) -> int:
    cfg = BenchConfig.from_args(args)
    result = run_bench(cfg)
    for t in cfg.targets:
        if t.serve_flags is not None:
            print(f"{t.label}: pdserve serve {t.serve_flags}")
    print(summary(result.runs, cfg.slo_grid))
    for line in mismatch_lines(cfg, result.runs):
        print(line)
    if cfg.out is not None:
        path = write_results(cfg.out, result.preamble(getattr(args, "argv", sys.argv[1:])), result.runs)
        plots = write_plots(cfg.out, result.runs, cfg.slo_grid)
        print(f"pdserve bench: wrote {path} and {len(plots)} plot(s)", file=sys.stderr)
    return 0


def commands() -> list:
    return [("bench", "TTFT/TPOT/ITL/E2E and throughput of a pdserve server under load", add_args, run)]


def main(argv: list[str] | None = None) -> int:
    """`pdserve bench ...` without the dispatcher (same parser, same one-line errors, exit status 2)."""
    from llama_relax.cli import build_parser, run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(commands()).parse_args(["bench", *argv])
    args.argv = argv
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

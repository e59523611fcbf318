"""Command-line entry point: thin; parses, calls the library, prints.

Exit status: 0 success; 1 a check failed (`verify`); 2 a user error (bad file, option, config key,
output directory), printed as one line naming the file, line, key or option; 3 an internal error
(a bug: one line, SIDREC_DEBUG=1 shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from sidrec import io
from sidrec.cli_args import int_range, one_char
from sidrec.errors import SidrecWarning, UserError


def _table(rows: list[tuple[str, object]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def print_stats(stats: dict) -> None:
    print(_table([(k, v) for k, v in stats.items()]))


# ----------------------------------------------------------------------------------------- data
def cmd_data_prepare(a: argparse.Namespace) -> None:
    from sidrec import io, run
    from sidrec.pipeline import write_data, write_data_streamed

    io.check_output_dir(a.out, "data", overwrite=a.overwrite, inputs=(a.path, a.meta))
    settings = {"format": a.format, "path": a.path, "meta": a.meta, "kcore": a.kcore, "dedup": a.dedup,
                "max_seq_len": a.max_seq_len, "item_id_col": a.item_id_col}
    if a.format == "csv":
        settings.update(user_col=a.user_col, item_col=a.item_col, time_col=a.time_col, sep=a.sep)
    if a.engine == "duckdb":
        if a.format != "csv":
            raise UserError("--engine duckdb: reads a Parquet log (--format csv with a .parquet file or a directory "
                            f"of them), not --format {a.format}")
        settings.update(engine="duckdb", memory_limit=a.memory_limit, shard_rows=a.shard_rows)
        stats = write_data_streamed(settings, Path(a.out), run.data_inputs(settings))
    else:
        stats = write_data(settings, Path(a.out), run.data_inputs(settings)).stats()
    print(f"wrote {a.out}")
    print_stats(stats)


def cmd_data_synth(a: argparse.Namespace) -> None:
    from sidrec import io, run
    from sidrec.pipeline import write_data

    io.check_output_dir(a.out, "data", overwrite=a.overwrite)
    syn = {"synthetic": {"n_items": a.items, "n_users": a.users, "dim": a.dim, "seed": a.seed}}
    data = write_data(syn, Path(a.out), run.data_inputs(syn))
    print(f"wrote {a.out}")
    print_stats(data.stats())


def cmd_data_stats(a: argparse.Namespace) -> None:
    from sidrec.data import SequenceData

    print_stats(SequenceData.load(a.data).stats())


def cmd_data_download(a: argparse.Namespace) -> None:
    from sidrec import io
    from sidrec.data.download import download, sha256

    if a.mirror is not None and not a.mirror.strip():
        raise UserError("--mirror: give a base URL (or leave the option out)")
    io.own_dir(a.out, "download")  # a new directory, or an earlier download to resume
    for p in download(a.name, a.out, base_url=a.mirror):
        print(f"{p}  sha256 {sha256(p)}")


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare, synthesise, inspect and download datasets")
    ds = p.add_subparsers(dest="data_cmd", required=True, metavar="{prepare,synth,stats,download}")

    q = ds.add_parser("prepare", help="read a raw log, filter, sort, split and save a data directory",
                      description="Read an interaction log, drop duplicates, apply iterative k-core, sort each "
                      "user's interactions chronologically (ties keep the file's order), map ids to 0..N-1 and "
                      "save a data directory with a leave-one-out split (last item test, second-to-last valid).")
    q.add_argument("--format", required=True, choices=["csv", "recbole", "ml-100k", "ml-1m", "amazon", "seq"],
                   help="csv: CSV/TSV/Parquet log; recbole: .inter (+ --meta .item); ml-100k: u.data (+ u.item); "
                   "ml-1m: ratings.dat (+ movies.dat); amazon: reviews_*_5.json[.gz] (+ meta_*.json[.gz]); "
                   "seq: 'user item item ...' lines (+ --meta items.jsonl)")
    q.add_argument("--path", required=True, help="the interaction file")
    q.add_argument("--meta", help="item side-information file (titles, categories, genres, ...)")
    q.add_argument("--out", required=True, help="output data directory (new, or one sidrec made)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing sidrec data directory at --out")
    q.add_argument("--kcore", type=int_range(0), default=5,
                   help="iterative k-core threshold (0 or 1: no filtering; default 5)")
    q.add_argument("--dedup", default="exact", choices=["exact", "user-item", "none"],
                   help="exact: drop repeated (user,item,timestamp) rows (default); user-item: keep first of each pair")
    q.add_argument("--max-seq-len", type=int_range(3), default=None,
                   help="keep only each user's most recent N interactions (N >= 3: leave-one-out needs three)")
    q.add_argument("--user-col", default="user_id", help="csv: user column (default user_id)")
    q.add_argument("--item-col", default="item_id", help="csv: item column (default item_id)")
    q.add_argument("--time-col", default="timestamp", help="csv: timestamp column, or 'none' to use file order")
    q.add_argument("--sep", type=one_char, default=None, help="csv: field separator (default: tab for .tsv, else comma)")
    q.add_argument("--item-id-col", default=None, help="id column of the --meta item table (default item_id)")
    q.add_argument("--engine", default="pandas", choices=["pandas", "duckdb"],
                   help="pandas: in memory (default); duckdb: out of core, for Parquet logs larger than memory "
                   "(a file or a directory of them), writing sequences as Parquet parts of whole users")
    q.add_argument("--memory-limit", default="4GB", help="duckdb: the engine's memory limit (default 4GB; it spills "
                   "to disk beyond it)")
    q.add_argument("--shard-rows", type=int_range(1), default=20_000_000,
                   help="duckdb: interactions per sequence part (whole users; default 20,000,000)")
    q.set_defaults(func=cmd_data_prepare)

    q = ds.add_parser("synth", help="generate synthetic data with a known ground truth P*(item | history)",
                      description="Items with a category/subcategory latent hierarchy and synthetic titles; users "
                      "follow a Markov process over latent item vectors with popularity. P* is saved (world.npz) "
                      "so KL to the truth and Bayes-optimal metrics can be computed.")
    q.add_argument("--out", required=True, help="output data directory (new, or one sidrec made)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing sidrec data directory at --out")
    q.add_argument("--items", type=int_range(2), default=2000)
    q.add_argument("--users", type=int_range(3), default=5000)
    q.add_argument("--dim", type=int_range(1), default=16, help="latent dimension")
    q.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0)
    q.set_defaults(func=cmd_data_synth)

    q = ds.add_parser("stats", help="print the statistics of a prepared data directory")
    q.add_argument("data")
    q.set_defaults(func=cmd_data_stats)

    q = ds.add_parser("download", help="download a public dataset (checksummed, resumable)")
    q.add_argument("name", help="ml-100k, ml-1m or amazon-<category> (beauty, sports, toys, ...)")
    q.add_argument("--out", required=True, help="download directory (new, or an earlier download to resume)")
    q.add_argument("--mirror", default=None, help="base URL of a mirror holding the same file names")
    q.set_defaults(func=cmd_data_download)


# ----------------------------------------------------------------------------------------- main
class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2): the option and what is wrong, then a hint."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="sidrec",
        description="Generative recommendation with bijective semantic IDs: prepare data, tokenize items, "
        "train AR-NTP / FV-MLE / parallel heads on one backbone, decode, evaluate and verify that "
        "AR-NTP with a bijective tokenizer is full-item-vocabulary MLE.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    add_data_commands(sub)
    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands() -> list:
    """Later stages register their subcommands here (kept lazy so `--help` stays fast)."""
    from sidrec import commands

    return commands.REGISTER


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sidrec: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    warnings.simplefilter("ignore")  # libraries' warnings are not the user's business here
    warnings.simplefilter("default", SidrecWarning)
    try:
        with io.writer_session():  # the directories a command takes are released when it ends
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"sidrec: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be written or read: the user's to fix
        where = f"{e.filename}: " if e.filename else ""
        print(f"sidrec: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sidrec: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("sidrec: error: out of memory; lower the batch size, history length (max_len) or model size",
              file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError" and "allocate" not in str(e):
            return _internal(e)
        print(f"sidrec: error: out of memory ({str(e).splitlines()[0][:200]}); lower the batch size, history "
              "length (max_len) or model size", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line, not a traceback (SIDREC_DEBUG=1 shows it)
        return _internal(e)


def _internal(e: Exception) -> int:
    if os.environ.get("SIDREC_DEBUG"):
        raise e
    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    print(f"sidrec: internal error: {type(e).__name__}: {msg} (a bug; SIDREC_DEBUG=1 shows the traceback)",
          file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())

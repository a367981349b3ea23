"""`slimgraph finetune MODEL -o OUT --data TRAIN.npz ...`: recover accuracy.

Trains the ONNX graph itself through the torch backend: fine-tuning on labels, knowledge
distillation from a teacher (response, feature, relation; offline, online or self), and
quantization-aware training when MODEL is a QDQ model (same op multiset out). Prints one line per
epoch on stderr (loss, validation metric) and a summary; `--json` prints one object, `--report DIR`
writes report.json/report.txt with the training curves. OUT is written atomically, only on
success, never over MODEL or the teacher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import slimgraph.ir as sg_ir
from slimgraph.api.finetune import finetune_with_report
from slimgraph.errors import BadOptionError, OutputPathError
from slimgraph.runtime.budget import budget_judge
from slimgraph.runtime.finetune import SCHEMES, FinetuneReport, metric_text, parse_kd
from slimgraph.tools._common import add_json_option, add_model_arguments, output_paths, print_result
from slimgraph.tools.budget_args import add_budget_arguments, describe_evaluation
from slimgraph.tools.report import add_report_option, check_report_dir, command_line, write_report

__all__ = ["register", "run", "report_dict"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="recover accuracy: fine-tune, distil from a teacher, or QAT a QDQ model",
        description=(
            "Train the ONNX graph itself (torch backend) on labelled data and/or a teacher "
            "model, then write the trained weights back into the same graph. A pruned or "
            "factorized model distils from the original (--teacher); a QDQ int8 model is "
            "trained quantization-aware and keeps its op types and counts."
        ),
    )
    add_model_arguments(parser, "the .onnx model to train")
    parser.add_argument("--data", required=True, metavar="TRAIN.npz",
                        help="training data: the model's inputs (+ labels) stacked on axis 0")
    parser.add_argument("--labels", default="labels", metavar="KEY",
                        help="labels key in the .npz files (default labels)")
    parser.add_argument("--teacher", metavar="T.onnx",
                        help="teacher model with the same inputs (e.g. the unpruned model)")
    parser.add_argument("--kd", default="response", metavar="KINDS",
                        help="knowledge kinds, comma-separated: response,feature,relation "
                             "(default response; used with a teacher or --scheme self)")
    parser.add_argument("--feature-layers", dest="feature_layers", nargs="+", metavar="NAME",
                        help="torch layer or value names matched for feature KD (default: "
                             "every top-level layer)")
    parser.add_argument("--feature-loss", dest="feature_loss", choices=("mse", "cosine"),
                        default="mse", help="feature KD by MSE (default) or 1 - cosine over "
                                            "channels (embeddings, e.g. a last hidden state)")
    parser.add_argument("--relation-layer", dest="relation_layer", metavar="NAME",
                        help="layer or value for relation KD (default: the first output)")
    parser.add_argument("--scheme", choices=SCHEMES, default="offline",
                        help="offline: frozen teacher (default); online: teacher trained "
                             "alongside; self: the model's own moving average")
    parser.add_argument("--epochs", type=int, default=10, help="epochs (default 10; 0 trains "
                                                               "nothing)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=64,
                        help="rows per step (default 64)")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate, cosine decay (default: measured by a short "
                             "learning-rate range test on the model and data)")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="optimizer (default adamw)")
    parser.add_argument("--weight-decay", dest="weight_decay", type=float, default=1e-4,
                        help="weight decay (default 1e-4)")
    parser.add_argument("--temperature", type=float, default=4.0,
                        help="response-KD temperature (default 4)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="weight of the KD term against the label loss (default 0.5)")
    parser.add_argument("--val", metavar="VAL.npz",
                        help="validation data: accuracy (or cosine to the teacher) per epoch")
    parser.add_argument("--learn-scales", dest="learn_scales", action="store_true",
                        help="QAT: learn activation quantization scales (LSQ)")
    parser.add_argument("--seed", type=int, default=0, help="seed: same seed, same result")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bar (it shows only on a terminal anyway)")
    add_json_option(parser)
    add_budget_arguments(parser, data=False, labels=False, data_flag="--val",
                         reference="the teacher (else the input model)")
    add_report_option(parser, "the training curves")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    source, target = output_paths(args, [(args.teacher, "the teacher")])
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{target}: the folder '{folder}' does not exist")
    report_dir = check_report_dir(args.report)
    kinds = parse_kd(args.kd)
    model = sg_ir.load(source)
    teacher = sg_ir.load(args.teacher) if args.teacher else None
    judge = None
    if args.max_drop is not None or args.min_cosine is not None:
        if args.val is None:
            raise BadOptionError("an accuracy budget (--max-drop/--min-cosine) is measured on "
                                 "--val VAL.npz: give it")
        judge = budget_judge(teacher or model, args.val, max_drop=args.max_drop,
                             min_cosine=args.min_cosine, labels=args.labels)

    def on_epoch(record: Any) -> None:
        if args.json or record.epoch == 0 and record.val is None:
            return
        parts = [f"epoch {record.epoch}/{args.epochs}"]
        if record.loss is not None:
            parts.append(f"loss {record.loss:.4f}")
        if record.val is not None:
            parts.append(f"val {record.metric} {metric_text(record.val, record.metric)}")
        if record.epoch:
            parts.append(f"{record.seconds:.1f} s")
        print("  ".join(parts), file=sys.stderr, flush=True)

    trained, report = finetune_with_report(
        model, args.data, labels=args.labels, teacher=teacher, kd=kinds, scheme=args.scheme,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, temperature=args.temperature, alpha=args.alpha,
        feature_layers=args.feature_layers, feature_loss=args.feature_loss,
        relation_layer=args.relation_layer, val=args.val,
        seed=args.seed, learn_scales=args.learn_scales, progress=args.progress,
        on_epoch=on_epoch,
    )  # fmt: skip
    data = {"input": str(source), "output": str(target), "data": str(args.data),
            "teacher": args.teacher, **report.to_dict()}  # fmt: skip
    text = f"wrote {target}\n{report}"
    if judge is not None:  # a model that misses the budget is never written
        evaluation = judge.check(trained, what="the fine-tuned model")
        data["budget"] = evaluation.to_dict()
        text += "\n" + describe_evaluation(evaluation, judge)
    if report_dir is not None:  # the page renders before anything is written
        write_report(report_dir, report_dict(report, data, command_line(args)), text=text)
    sg_ir.save(trained, target)
    return print_result(args, data, text)


def report_dict(
    report: FinetuneReport, data: dict[str, Any], command: str = "slimgraph finetune"
) -> dict[str, Any]:
    """The `--report` dict (tools.report schema): summary, epoch table, training curves."""
    history = report.history
    records = history.records if history is not None else []
    trained = [r for r in records if r.epoch > 0]
    plots: list[dict[str, Any]] = []
    if trained:
        plots.append({"kind": "line", "title": "training loss", "x_label": "epoch",
                      "y_label": "loss", "series": [{"name": "loss", "x": [r.epoch for r in
                      trained], "y": [r.loss for r in trained]}]})  # fmt: skip
    if any(r.val is not None for r in records):
        plots.append({"kind": "line", "title": f"validation {report.metric}", "x_label": "epoch",
                      "y_label": report.metric, "series": [{"name": "model", "x": [r.epoch for r
                      in records], "y": [r.val for r in records]}]})  # fmt: skip
        if report.teacher_val is not None:
            plots[-1]["series"].append({"name": "teacher", "x": [records[0].epoch,
                                        records[-1].epoch], "y": [report.teacher_val] * 2})
    return {
        "title": f"slimgraph finetune: {Path(str(data['input'])).name}",
        "command": command,
        "summary": {
            "scheme": report.scheme, "knowledge": ", ".join(report.kd) or "labels only",
            "epochs": report.epochs, "QAT": report.qat,
            f"val {report.metric} before": metric_text(report.before, report.metric),
            f"val {report.metric} after": metric_text(report.after, report.metric),
            "teacher val": metric_text(report.teacher_val, report.metric),
            "seconds per epoch": report.seconds_per_epoch,
        },
        "tables": [{"title": "epochs", "columns": ["epoch", "loss", "val", "seconds"],
                    "rows": [[r.epoch, r.loss, r.val, r.seconds] for r in records]}],
        "plots": plots,
        **data,
    }

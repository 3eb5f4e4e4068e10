"""Does intermediate-state KD (Minitron's L_is) lift the demo student's BLiMP?  (issue 16: it did not)

Minitron (Muralidharan et al. 2024) distils a depth-pruned student with a loss on intermediate hidden states as well
as on logits. The demo's student is pruned from the teacher, so each of its 8 layers *is* a teacher layer (the
kept ones) and its 384 channels are 384 of the teacher's 576: its hidden state after layer ``i`` can be matched to
the teacher's after layer ``kept[i]`` on those channels, no projection needed. Both arms run in this one loop on
the demo's own training blocks (``prepare_run`` of its ``kd/config.yaml``), same order, same AdamW rate and
schedule, same steps; the teacher runs live once per block (its hidden states kept in memory):

* ``kd``: forward KL on the answer and plain-text positions, dense teacher logits;
* ``kd_hid``: the same + ``lambda`` x mean over the 8 layers of ``||h_s - h_t[kept channels]||² / ||h_t||²``
  over every position but each block's first (whose activations are orders of magnitude larger).

Kept layers and channels are read off the weights: the student's embedding columns are teacher columns, and each
student layer's input norm equals one teacher layer's on those channels.

    flock /tmp/distillery-bench.lock .venv/bin/python benchmarks/hidden_state_kd.py --demo-dir runs/bench/demo \\
        --out benchmarks/results/hidden_state_kd.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def pruned_map(student, teacher) -> tuple[torch.Tensor, list[int]]:
    """(teacher channel of each student channel, teacher layer of each student layer), from the weights."""
    es, et = student.get_input_embeddings().weight.detach(), teacher.get_input_embeddings().weight.detach()
    ch = torch.tensor([int((et[:2000] - es[:2000, j:j + 1]).abs().sum(0).argmin()) for j in range(es.shape[1])])
    if len(set(ch.tolist())) != len(ch) or float((et[:, ch] - es).abs().max()) != 0:
        raise SystemExit("the student's embedding is not a column slice of the teacher's: not pruned from it")
    kept = []
    for layer in student.model.layers:
        w = layer.input_layernorm.weight.detach()
        errs = [float((t.input_layernorm.weight.detach()[ch] - w).abs().max()) for t in teacher.model.layers]
        kept.append(min(range(len(errs)), key=errs.__getitem__))
        if errs[kept[-1]] != 0:
            raise SystemExit(f"student layer {len(kept) - 1} matches no teacher layer")
    return ch, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", required=True, help="a finished demo folder (benchmarks/demo.py --work-dir)")
    ap.add_argument("--arms", default="kd,kd_hid")
    ap.add_argument("--steps", type=int, default=360)
    ap.add_argument("--hidden-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/hidden_state_kd.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from distillery.config import load_config
    from distillery.data import make_loader
    from distillery.run_setup import prepare_run
    from distillery.tasks.blimp import load_pairs, retained_above_chance, score_blimp
    from distillery.teachers import load_teacher
    from distillery.train import lr_lambda

    demo = Path(args.demo_dir)
    machine = common.machine_info(threads=args.threads)
    cfg = load_config(str(demo / "kd" / "config.yaml"), [])
    run = prepare_run(cfg, torch.device("cpu"))  # the demo's blocks (its teacher cache serves them)
    teacher = load_teacher("smollm2", device="cpu", dtype="float32").model.eval()
    pairs = load_pairs(per_paradigm=10)
    t_blimp = score_blimp(teacher, run.tokenizer, pairs)["overall"]
    memo: dict[int, torch.Tensor] = {}  # block index -> teacher hidden states at the kept layers + the last
    rows = []
    for arm in args.arms.split(","):
        student = AutoModelForCausalLM.from_pretrained(demo / "pruned_init", dtype=torch.float32)
        ch, kept = pruned_map(student, teacher)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=0.0)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.warmup_steps, args.steps, cfg.train.min_lr_ratio))
        t0, step, epoch, hid = time.perf_counter(), 0, 0, arm == "kd_hid"
        while step < args.steps:
            for batch in make_loader(run.train, cfg.train.micro_batch_size, seed=0, epoch=epoch).batches():
                if step >= args.steps:
                    break
                ids, am, pos, labels = batch["input_ids"], batch["attention_mask"], batch.get("position_ids"), batch["labels"]
                idx = batch["index"].tolist()
                miss = [j for j, k in enumerate(idx) if k not in memo]
                if miss:
                    with torch.no_grad():
                        mo = teacher.model(input_ids=ids[miss], attention_mask=am[miss],
                                           position_ids=None if pos is None else pos[miss], output_hidden_states=True)
                    for r, j in enumerate(miss):
                        memo[idx[j]] = torch.stack([mo.hidden_states[L + 1][r] for L in kept] + [mo.last_hidden_state[r]])
                th = torch.stack([memo[k] for k in idx])  # (B, layers + 1, T, D)
                with torch.no_grad():
                    t_logits = teacher.lm_head(th[:, -1])
                so = student(input_ids=ids, attention_mask=am, position_ids=pos, output_hidden_states=hid)
                m = labels[:, 1:] != -100
                kl = F.kl_div(F.log_softmax(so.logits[:, :-1][m].float(), -1),
                              F.log_softmax(t_logits[:, :-1, :so.logits.shape[-1]][m].float(), -1),
                              log_target=True, reduction="batchmean")
                loss, hl = kl, torch.tensor(0.0)
                if hid:
                    vm = am.bool().clone()
                    vm[:, 0] = False  # the first position carries the massive activations
                    hl = torch.stack([((so.hidden_states[i + 1][vm] - th[:, i][vm][:, ch]) ** 2).mean()
                                      / (th[:, i][vm][:, ch] ** 2).mean() for i in range(len(kept))]).mean()
                    loss = kl + args.hidden_weight * hl
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                sch.step()
                step += 1
                if step % 20 == 0:
                    print(f"{arm} {step} kl {kl.item():.3f} hid {hl.item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
            epoch += 1
        b = score_blimp(student.eval(), run.tokenizer, pairs)
        rows.append({"arm": arm, "kept_layers": kept, "hidden_weight": args.hidden_weight if hid else 0.0,
                     "steps": args.steps, "blimp": b["overall"], "per_field": b["per_field"],
                     "kept_above_chance": retained_above_chance(b["overall"], t_blimp),
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        common.write_demo_result("hidden_state_kd", machine, demo, Path(args.out), teacher_blimp=t_blimp,
                                 pairs=len(pairs), rows=rows)


if __name__ == "__main__":
    main()

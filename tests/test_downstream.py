"""Downstream accuracy (--eval_tasks, tinytron-eval) on the committed sample
tests/fixtures/eval/shakespeare_mc.jsonl (20 items; see its README): the accuracies equal those
lm-evaluation-harness computes for the exported Hugging Face model, and are the same at world 1
and 2 (data-parallel, Ulysses and expert-parallel layouts).

The model has weights of init_std 0.3: logits far from uniform, so the endings' log-likelihoods
differ by more than their token counts and a misaligned or mis-tokenized continuation changes
them visibly. Log-likelihood tolerance 1e-5 relative (over the largest): the two sides compute
the same fp32 math and differ only in summation order and kernels (measured below 1e-6); the
accuracies must be equal exactly.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.dist_helper import run_distributed
from tests.utils import max_rel, read_log, tiny_config
from tinytron.commands.eval import main as eval_main
from tinytron.commands.export import main as export_main
from tinytron.data.multiple_choice import read_task
from tinytron.training import Trainer
from tinytron.training.config import ConfigError, validate_config
from tinytron.training.metrics import read_records

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "tests" / "fixtures" / "eval" / "shakespeare_mc.jsonl"
TOKENIZER = REPO / "data" / "tinyshakespeare" / "tokenizer"
# The tokenizer's 4,096 tokens; block_size 32 is shorter than the longest items (35 tokens), so
# lm-eval's left truncation is exercised too; 2 sequences of 32 tokens per forward.
FLAGS = ["--vocab_size", "4096", "--block_size", "32", "--seq_len", "32", "--init_std", "0.3",
         "--total_batch_size", "128", "--no-do_val", "--eval_tasks", str(TASK), "--tokenizer", str(TOKENIZER)]
MOE = ["--use_moe", "--num_experts", "4", "--num_experts_per_tok", "2", "--moe_intermediate_size", "32"]
PARITY = FLAGS + ["--max_steps", "2", "--warmup_steps", "1", "--eval_every_steps", "2", "--no-do_save"]
TOL = 1e-5


def _lm_eval(hf_dir: Path, work: Path) -> tuple[float, float, np.ndarray]:
    """lm-evaluation-harness on `hf_dir` with TASK as a local multiple_choice task ->
    (acc, acc_norm, log-likelihoods [item][ending])."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    (work / "tasks").mkdir(parents=True)
    (work / "tasks" / "mc.yaml").write_text(f"""task: tinytron_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {TASK}}}
  cache_dir: {work / "datasets"}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: endings
doc_to_target: label
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=["tinytron_mc"],
                                  task_manager=TaskManager(include_path=str(work / "tasks")), device="cpu",
                                  batch_size=8, log_samples=True)
    result = out["results"]["tinytron_mc"]
    samples = sorted(out["samples"]["tinytron_mc"], key=lambda s: s["doc_id"])
    return result["acc,none"], result["acc_norm,none"], [[r[0][0] for r in s["resps"]] for s in samples]


def _flat(logliks) -> np.ndarray:
    import torch
    return torch.tensor([ll for item in logliks for ll in item], dtype=torch.float64)


def test_trainer_and_tinytron_eval_equal_lm_eval(tmp_path, monkeypatch):
    """Train 4 steps with --eval_tasks (scored after steps 2 and 4): log.txt, metrics.jsonl and
    TensorBoard get the accuracies; the final ones equal tinytron-eval's on the step-4
    checkpoint and lm-eval's on its export, and so do the per-ending log-likelihoods."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    trainer = Trainer(tiny_config(tmp_path / "logs", *FLAGS, "--max_steps", "4", "--eval_every_steps", "2",
                                  "--tensorboard"))
    trainer.train()
    run = Path(trainer.run_dir)
    records = {r["step"]: r for r in read_records(run / "metrics.jsonl")}
    scored = [s for s, r in records.items() if "eval/shakespeare_mc/acc" in r]
    assert scored == [1, 3]
    final = records[3]["eval/shakespeare_mc/acc"], records[3]["eval/shakespeare_mc/acc_norm"]
    lines = [line.split() for line in (run / "log.txt").read_text().splitlines() if " eval " in line]
    assert [(int(w[0]), w[2], float(w[4]), float(w[6]), int(w[8])) for w in lines][-1] == (3, "shakespeare_mc",
                                                                                           *final, 20)
    assert len(read_log(str(run))) == 4  # the train lines are still one per step
    from tests.test_metrics import _tb_scalars
    assert [s for s, _ in _tb_scalars(str(run), "eval/shakespeare_mc/acc_norm")] == [1, 3]

    eval_main(["--checkpoint", str(run), "--tasks", str(TASK), "--device", "cpu", "--out", str(tmp_path / "ours.json")])
    ours = json.loads((tmp_path / "ours.json").read_text())["tasks"]["shakespeare_mc"]
    export_main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--tokenizer", str(TOKENIZER)])
    acc, acc_norm, logliks = _lm_eval(tmp_path / "hf", tmp_path / "lm_eval")

    assert (ours["acc"], ours["acc_norm"]) == (acc, acc_norm) == final
    assert max_rel(_flat(ours["loglikelihoods"]), _flat(logliks)) < TOL
    # The sample is not decided by length alone: acc and acc_norm pick differently somewhere.
    lls = [np.array(item) for item in logliks]
    chars = [np.array([len(e) for e in item.endings]) for item in read_task(str(TASK))]
    assert any(np.argmax(ll) != np.argmax(ll / c) for ll, c in zip(lls, chars))


def _run_layouts(log_dir: str, layouts: list[list[str]]) -> list:
    """Train each layout in this world; -> [(final metrics.jsonl record (rank 0's), TaskScore)]."""
    out = []
    for i, flags in enumerate(layouts):
        trainer = Trainer(tiny_config(f"{log_dir}/{i}", *flags))
        trainer.train()
        record = read_records(os.path.join(trainer.run_dir, "metrics.jsonl"))[-1]
        scores = trainer.downstream.evaluate(trainer.model, trainer._autocast)["shakespeare_mc"]
        out.append((record, scores, len(trainer.downstream.batches)))
    return out


def test_world_1_and_2_score_the_same(tmp_path):
    """Dense at dp 2 and at sep 2 (Ulysses), MoE at sep 2 (experts split), dense at dp 2 with
    --fsdp (the ranks hold different numbers of batches; FSDP's forwards are collective): the same
    accuracies as world 1 exactly, in metrics.jsonl too, and the same log-likelihoods within TOL (2
    training steps in another summation order, then the scoring's own)."""
    layouts = [PARITY + ["--sep_size", "1"], PARITY + ["--sep_size", "2"], PARITY + MOE + ["--sep_size", "2"],
               PARITY + ["--sep_size", "1", "--fsdp"]]
    world2 = run_distributed(_run_layouts, 2, str(tmp_path / "w2"), layouts)
    assert [s for _, s, _ in world2[0]] == [s for _, s, _ in world2[1]]  # every rank has every result
    assert world2[0][3][2] != world2[1][3][2]  # the --fsdp ranks hold different numbers of batches
    dense, moe = _run_layouts(str(tmp_path / "w1"), [PARITY, PARITY + MOE])
    for (record, score, _), (ref_record, ref, _) in zip(world2[0], [dense, dense, moe, dense]):
        assert (score.acc, score.acc_norm) == (ref.acc, ref.acc_norm)
        assert {k: v for k, v in record.items() if k.startswith("eval/")} == \
               {k: v for k, v in ref_record.items() if k.startswith("eval/")} != {}
        assert max_rel(_flat(score.loglikelihoods), _flat(ref.loglikelihoods)) < TOL


@pytest.mark.parametrize("flags, message", [
    (["--eval_tasks", str(TASK)], "--eval_tasks needs --tokenizer"),
    (["--eval_tasks", "nowhere.jsonl", "--tokenizer", str(TOKENIZER)], "--eval_tasks nowhere.jsonl is not a file"),
])
def test_bad_flags(flags, message, tmp_path):
    """(--eval_every_steps's range is checked with every flag's: tests/test_flags.py.)"""
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config(tmp_path, *flags), 1)


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "nowhere", "--tasks", str(TASK)], "--checkpoint nowhere does not exist"),
    (["--checkpoint", ".", "--tasks", "nowhere.jsonl"], "nowhere.jsonl: cannot read (FileNotFoundError)"),
    (["--checkpoint", ".", "--tasks", ""], "'' names no task file"),
    (["--checkpoint", ".", "--tasks", " , "], "' , ' names no task file"),
    (["--checkpoint", ".", "--tasks", "BAD"], "BAD line 2: not JSON (Expecting value)"),   # a bad task file
])
def test_tinytron_eval_errors(args, message, tmp_path, capsys):
    """Bad input of tinytron-eval, as of every command: one line, exit 2."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "endings": ["b", "c"], "label": 0}\nnot json\n')
    with pytest.raises(SystemExit) as exit_:
        eval_main([str(bad) if a == "BAD" else a for a in args] + ["--device", "cpu"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"[tinytron] error: {message.replace('BAD', str(bad))}\n"


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "endings": ["b", "c"], "label": 2}', r'"label" must be an index into "endings" \(0..1\)'),
    ('{"context": "a", "endings": ["b"], "label": 0}', '"endings" must be a list of at least 2'),
    ('{"endings": ["b", "c"], "label": 0}', 'needs a string "context"'),
    ("not json", "not JSON"),
])
def test_bad_task_files(line, message, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"ctx": "HellaSwag names it ctx", "endings": ["b", "c"], "label": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"{path} line 2: {message}"):
        read_task(str(path))


def test_task_file_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"context": "caf\u00e9", "endings": ["b", "c"], "label": 0}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{path}: not UTF-8 text \(byte 16\)$"):
        read_task(str(path))


def test_contexts_longer_than_the_block_warn(tmp_path):
    """Cut from the left as lm-eval does (block_size 32 here), and said, as lm-eval says it."""
    with pytest.warns(UserWarning, match=r"scored sequences are longer than block_size \+ 1 = 33 tokens: their "
                      "contexts are cut from the left"):
        Trainer(tiny_config(tmp_path, "--eval_tasks", str(TASK), "--tokenizer", str(TOKENIZER), "--vocab_size", "4096",
                            "--block_size", "32"))


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    with pytest.raises(ConfigError, match="--eval_tasks: the tokenizer gives token id .* not below --vocab_size 64"):
        Trainer(tiny_config(tmp_path, "--eval_tasks", str(TASK), "--tokenizer", str(TOKENIZER)))

"""scripts/evaluate.py and scripts/sample.py --workdir on a tiny trained run:
the trainer's evaluation repeated exactly, its generations, one-line
errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import runs
from rlx import testing
from rlx import trainer
from rlx.config import ConfigError
from rlx.logbook import read_metrics
from rlx.models import kv_cache
from rlx.rewards import chain_arith

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, *args):
  """Runs scripts/<name>.py (conftest's environment: CPU devices, the
  compilation cache); returns the finished process."""
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', f'{name}.py'), *args],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('evaluate')
  c = testing.tiny_config_dict(str(tmp))
  c.rl.num_steps = 2  # Evaluations at steps 0 and 2, a checkpoint at 2.
  # An untrained policy: its samples (lengths, truncation) still identify
  # the draws, which is what the equality below is about.
  c.warmstart.num_steps = 0
  c.log.memory_stats = False
  workdir = str(tmp / 'run')
  trainer.train(config_lib.build(c), workdir)
  return workdir


@pytest.fixture(scope='module')
def cli_default(workdir):
  """`evaluate.py --workdir` with the defaults: (JSON line, records)."""
  proc = _script('evaluate', f'--workdir={workdir}')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 1, proc.stdout  # Library logs went to log.txt.
  out = json.loads(lines[0])
  with open(out['out']) as f:
    records = [json.loads(line) for line in f]
  return out, records


@pytest.fixture(scope='module')
def saved(workdir):
  return runs.load(workdir)


@pytest.fixture(scope='module')
def cli():
  """rlx.cli.evaluate and rlx.cli.sample (through their scripts, which
  settle absl flag names that several commands define)."""
  return (testing.load_script('evaluate').evaluate,
          testing.load_script('sample').sample)


def test_defaults_repeat_the_trainers_last_evaluation(workdir, cli_default):
  out, records = cli_default
  last = [r for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if 'eval/pass@1' in r][-1]
  assert (out['step'], out['k'], out['num_prompts']) == (2, 2, 8)
  assert last['step'] == 2
  assert out['pass@1'] == last['eval/pass@1']
  assert out['pass@2'] == last['eval/pass@2']
  assert out['response_len'] == last['eval/response_len']
  assert out['truncated_frac'] == last['eval/truncated_frac']
  assert out['best_of_2'] == out['pass@2']  # k samples: pass@k is best-of-k.
  assert 0.0 <= out['maj@2'] <= out['best_of_2']
  assert out['out'] == os.path.join(workdir, 'eval', 'step_2.jsonl')
  assert len(records) == 8 and all(len(r['responses']) == 2
                                   for r in records)
  for r in records:  # The verifier's verdicts and answers, recomputed.
    np.testing.assert_array_equal(
        r['rewards'], chain_arith.score(r['responses'], [r['answer']] * 2))
    assert r['extracted'] == [chain_arith.extract_answer(t)
                              for t in r['responses']]
  assert np.mean([r['rewards'] for r in records]) == out['pass@1']


def test_fewer_prompts_keep_their_samples_another_k_redraws(
    saved, cli, cli_default):
  evaluate_cli, _ = cli
  _, full = cli_default
  summary, records = evaluate_cli.evaluate_run(saved, num_prompts=3)
  assert (summary['num_prompts'], summary['k']) == (3, 2)
  assert records == full[:3]
  summary, records = evaluate_cli.evaluate_run(saved, samples=3,
                                               num_prompts=3)
  assert {'pass@1', 'pass@3', 'maj@3', 'best_of_3'} <= set(summary)
  assert all(len(r['responses']) == 3 for r in records)
  assert [r['responses'][:2] for r in records] != [r['responses']
                                                   for r in full[:3]]
  with pytest.raises(ConfigError, match='--num_prompts=17: the task has 16'):
    evaluate_cli.evaluate_run(saved, num_prompts=17)


def test_test_files_on_a_chain_arith_run_is_a_one_line_error(workdir, cli):
  evaluate_cli, _ = cli
  with pytest.raises(ConfigError, match="--test_files: the run's task is "
                     'chain_arith'):
    evaluate_cli.load_run(workdir, test_files='x.jsonl')
  proc = _script('evaluate', f'--workdir={workdir}', '--test_files=x.jsonl')
  assert proc.returncode == 1 and proc.stdout == ''
  assert proc.stderr.startswith('config error: --test_files: ')
  assert len(proc.stderr.splitlines()) == 1


def _greedy_reference(run, prompt):
  """Greedy decoding without a cache, one full forward pass per token (an
  independent path to the sampler's): the argmax after the prompt's ids,
  until a stop token or the response budget."""
  tok = run.task.tokenizer
  seq = run.task.prompt_ids_fn(prompt)
  start, budget = len(seq), run.cfg.sampling.max_new_tokens
  length = start + budget

  @jax.jit
  def next_logits(tokens, at):
    mask = jnp.ones_like(tokens, bool)
    positions = kv_cache.positions_from_mask(mask)
    attention = kv_cache.causal_mask(mask, query_len=length, cache_index=0)
    logits = run.model.apply({'params': run.params}, tokens, positions,
                             attention)[0]
    return logits[0, at]

  while len(seq) < length:
    padded = np.array([seq + [tok.pad_id] * (length - len(seq))], np.int32)
    nxt = int(np.argmax(next_logits(padded, len(seq) - 1)))
    if nxt == tok.eos_id:
      break
    seq.append(nxt)
  return tok.decode(seq[start:])


def test_sample_from_a_run(workdir, saved, cli):
  _, sample_cli = cli
  task = saved.task
  # Task text is encoded as the task encodes its own prompts.
  tokens, mask = task.encode(task.test.prompts[:4])
  np.testing.assert_array_equal(tokens, task.test_prompts[:4])
  np.testing.assert_array_equal(mask, task.test_prompt_mask[:4])
  prompts = ['1a+1?', '2a*3b-4?']
  texts = sample_cli.sample_run(saved, prompts)  # Greedy.
  assert texts == [[_greedy_reference(saved, p)] for p in prompts]
  # The script samples the same (one compile: the same shapes, cached).
  proc = _script('sample', f'--workdir={workdir}',
                 *[f'--prompt={p}' for p in prompts])
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == ''.join(f'=== {p}\n--- sample 0\n{g[0]}\n'
                                for p, g in zip(prompts, texts))
  with pytest.raises(ConfigError, match="--prompt: character 'x'"):
    sample_cli.sample_run(saved, ['x?'])
  proc = _script('sample', f'--workdir={workdir}', '--model_dir=x',
                 '--prompt=1?')
  assert proc.returncode == 1
  assert proc.stderr == ('config error: give exactly one of --workdir (a run) and '
                         '--model_dir (a Hugging Face model directory)\n')

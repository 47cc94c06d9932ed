r"""GRPO with LoRA on a local Hugging Face model and local math files.

Set the model and the data on the command line; the placeholders below
fail with an error naming them:

  python scripts/train.py --config=configs/grpo_math_lora.py \
      --workdir=runs/math_lora \
      --config.model.hf_dir=/models/Qwen2.5-Math-1.5B \
      --config.task.train_files=/data/math/train.jsonl \
      --config.task.test_files=/data/math500/test.jsonl

Sized for a ~1.5B model (Qwen2.5-Math-1.5B, Qwen3-1.7B, Llama-3.2-1B) on
one 80 GB GPU: B = 32 prompts x G = 8 responses of up to T = 1024 tokens
per step, one on-policy update per step. Records need `problem` and
`answer` fields (MATH-500's layout); for Hendrycks MATH set
task.answer_field=solution and task.answer_extract=boxed, for GSM8K
task.problem_field=question and task.answer_extract=hashes.

LoRA (Hu et al. 2021) on every attention and MLP projection, rank 32:
Schulman et al., "LoRA Without Regret" (Thinking Machines, 2025) find that
RL needs very little adapter capacity and that LoRA's best learning rate is
about 10x full fine-tuning's (1e-6 is usual for GRPO on 1.5B models), hence
1e-5. No KL term and token-mean aggregation, as DAPO and Dr. GRPO
recommend; the KL reference would be the base itself (adapters off).
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  # Placeholders: override them (see the docstring).
  config.model.hf_dir = '/path/to/Qwen2.5-Math-1.5B'
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'bfloat16'  # The frozen base; adapters f32.
  config.task.name = 'math_files'
  config.task.train_files = '/path/to/math/train.jsonl'
  config.task.test_files = '/path/to/math/test.jsonl'
  config.task.num_train = 1_000_000  # All problems of train_files.
  config.task.num_test = 500  # MATH-500.
  config.task.prompt_len = 512  # Longer problems are dropped (logged).
  # Qwen2.5-Math's chain-of-thought system prompt; the verifier reads the
  # last \boxed{}.
  config.task.system_prompt = ('Please reason step by step, and put your '
                               'final answer within \\boxed{}.')
  config.warmstart.num_steps = 0  # Math files have no demonstrations.

  config.lora.rank = 32
  config.lora.alpha = 32.0
  config.lora.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')

  config.rl.num_steps = 200
  config.rl.batch_prompts = 32
  config.rl.group_size = 8
  config.sampling.max_new_tokens = 1024
  config.sampling.temperature = 1.0
  config.objective.advantage = 'grpo'
  config.objective.loss = 'ppo_clip'
  config.objective.clip_eps = 0.2
  config.objective.kl_beta = 0.0
  config.objective.aggregation = 'token-mean'
  config.optim.learning_rate = 1e-5
  config.optim.warmup_steps = 10
  config.optim.b2 = 0.999
  config.optim.max_grad_norm = 1.0
  # 32 prompts x 8 responses in 8 micro-batches of 32 sequences.
  config.optim.num_microbatches = 8
  # The output projection 2048 positions at a time: a micro-batch's
  # [positions, 151936] float32 logits would be tens of GB at once
  # (scripts/bench_learner_memory.py).
  config.optim.logits_chunk = 2048
  # Where cuDNN flash attention cannot run (TPU, float32), the learner's
  # attention 512 queries at a time rather than [32, heads, 1535, 1535].
  config.backend.attention_chunk = 512

  config.eval.every = 25
  config.eval.num_prompts = 500
  config.eval.samples_per_prompt = 4
  config.eval.batch_prompts = 64
  config.log.checkpoint_every = 10
  return config

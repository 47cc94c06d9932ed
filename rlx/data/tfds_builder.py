"""TFDS builder for chain arithmetic (see rlx.data.chain_arith).

The splits are written as array_record files and read back with
`builder.as_data_source()`, a random-access reader that needs no TensorFlow:
TFDS serializes examples with its own copy of the tf.train.Example protos.

Usage:

  config = make_config(num_train=1000, num_test=64)
  builder = ChainArith(config=config, data_dir=data_dir,
                       file_format='array_record')
  builder.download_and_prepare()  # A no-op once the files exist.
  test = builder.as_data_source(split='test')
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from rlx.data import chain_arith

_NAME = 'chain_arith'


@dataclasses.dataclass(eq=False)
class ChainArithConfig(tfds.core.BuilderConfig):
  """What to generate. A config's name must identify its values.

  Attributes:
    num_train: number of training problems.
    num_test: number of held-out problems.
    max_steps: the largest number of steps in a problem.
    zipf_s: Zipf exponent of the step distribution.
    seed: seed of the test split; the train split uses seed + 1.
  """

  num_train: int = 20000
  num_test: int = 512
  max_steps: int = 12
  zipf_s: float = 1.0
  seed: int = 0


DEFAULT_CONFIG = ChainArithConfig(
    name='default',
    description='20000 train / 512 test problems of 1-12 steps, Zipf s=1.',
)


def make_config(
    *,
    num_train: int = 20000,
    num_test: int = 512,
    max_steps: int = 12,
    zipf_s: float = 1.0,
    seed: int = 0,
) -> ChainArithConfig:
  """Returns the config for these values, named after them.

  TFDS keeps each config's files in a folder named after the config, so the
  name spells out every value: configs that differ never share files.

  Args:
    num_train: number of training problems.
    num_test: number of held-out problems.
    max_steps: the largest number of steps in a problem.
    zipf_s: Zipf exponent of the step distribution.
    seed: seed of the test split; the train split uses seed + 1.

  Returns:
    `DEFAULT_CONFIG` itself for the default values (TFDS refuses a custom
    config that reuses a registered config's name), else a new config.
  """
  values = dict(
      num_train=num_train,
      num_test=num_test,
      max_steps=max_steps,
      zipf_s=float(zipf_s),
      seed=seed,
  )
  if all(getattr(DEFAULT_CONFIG, k) == v for k, v in values.items()):
    return DEFAULT_CONFIG
  # repr keeps every float distinct; '.' and '-' are kept out of the name
  # because TFDS parses 'name/config:version' strings.
  zipf = repr(float(zipf_s)).replace('.', 'p').replace('-', 'm')
  name = (
      f'train{num_train}_test{num_test}_steps{max_steps}_zipf{zipf}_seed{seed}'
  )
  return ChainArithConfig(name=name, **values)


def _is_registered(name: str) -> bool:
  """Whether TFDS already holds a builder of this name."""
  try:
    tfds.core.registered.imported_builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return True


# TFDS registers builders by name when the class is defined and raises if the
# name is taken, which would break a second import of this file (a reload, or
# a test runner importing it under another module name).
class ChainArith(
    tfds.core.GeneratorBasedBuilder, skip_registration=_is_registered(_NAME)
):
  """Chain arithmetic modulo 10, with a held-out test split."""

  name = _NAME
  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': 'Labelled steps (7a+3b*2?) and a restated start digit.',
  }
  BUILDER_CONFIGS = [DEFAULT_CONFIG]
  DEFAULT_CONFIG_NAME = 'default'
  # code_path only locates a checksums.tsv of download URLs, and there are no
  # downloads. Worse, working it out for a builder inside a package imports
  # `importlib_resources`, which tensorflow-datasets 4.9 uses but does not
  # declare as a dependency.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo is built directly rather than through
    # dataset_info_from_configs, which would look for README/CITATIONS files
    # next to this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Chain arithmetic modulo 10: a start digit and n ops (+ - * with '
            'a digit operand) applied left to right; the solution writes '
            'every intermediate result, then ">" and the answer.'
        ),
        features=tfds.features.FeaturesDict({
            'id': np.int64,
            'prompt': tfds.features.Text(),
            'solution': tfds.features.Text(),
            'answer': tfds.features.Text(),
            'num_steps': np.int32,
        }),
        # Keep records in id order so that source[i] has id i.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated; nothing to download.
    config = self.builder_config
    # The test split is drawn first so that train can exclude its prompts.
    test = chain_arith.generate_split(
        num_examples=config.num_test,
        seed=config.seed,
        max_steps=config.max_steps,
        zipf_s=config.zipf_s,
    )
    train = chain_arith.generate_split(
        num_examples=config.num_train,
        seed=config.seed + 1,
        max_steps=config.max_steps,
        zipf_s=config.zipf_s,
        exclude={p.prompt for p in test},
    )
    return {
        'train': self._generate_examples(train),
        'test': self._generate_examples(test),
    }

  def _generate_examples(self, problems: list[chain_arith.Problem]):
    for i, problem in enumerate(problems):
      yield i, {
          'id': i,
          'prompt': problem.prompt,
          'solution': problem.solution,
          'answer': problem.answer,
          'num_steps': problem.num_steps,
      }

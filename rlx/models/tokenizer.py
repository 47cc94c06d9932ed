"""Tokenizer interface and a character-level implementation.

The rest of rlx only talks to the `Tokenizer` protocol, so a Hugging Face
tokenizer can be wrapped later without touching samplers or learners. The
`CharTokenizer` is enough for synthetic tasks whose text uses a tiny alphabet.
"""

from collections.abc import Sequence
import typing

# Special ids shared by every CharTokenizer; fixed so that padding with 0 is
# always safe and tests can hard-code them.
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_NUM_SPECIAL = 3


@typing.runtime_checkable
class Tokenizer(typing.Protocol):
  """What rlx needs from a tokenizer."""

  @property
  def vocab_size(self) -> int:
    """Number of ids, special ids included; valid ids are [0, vocab_size)."""
    ...

  @property
  def pad_id(self) -> int:
    ...

  @property
  def bos_id(self) -> int:
    ...

  @property
  def eos_id(self) -> int:
    ...

  def encode(
      self, text: str, *, add_bos: bool = False, add_eos: bool = False
  ) -> list[int]:
    """Maps text to ids, optionally framed by bos and/or eos."""
    ...

  def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
    """Maps ids to text, dropping pad/bos and stopping at the first eos."""
    ...


class CharTokenizer:
  """One id per character of a fixed alphabet.

  Ids 0, 1 and 2 are pad, bos and eos; the alphabet's characters follow from
  id 3 in the order given.
  """

  def __init__(self, alphabet: str):
    """Builds the vocabulary.

    Args:
      alphabet: the characters the tokenizer can encode, each exactly once.

    Raises:
      ValueError: if the alphabet is empty or repeats a character.
    """
    if not alphabet:
      raise ValueError('alphabet must not be empty')
    char_to_id = {}
    for position, char in enumerate(alphabet):
      if char in char_to_id:
        raise ValueError(
            f'alphabet repeats character {char!r} at position {position} '
            f'(first seen at position {char_to_id[char] - _NUM_SPECIAL})'
        )
      char_to_id[char] = position + _NUM_SPECIAL
    self._alphabet = alphabet
    self._char_to_id = char_to_id

  @property
  def alphabet(self) -> str:
    return self._alphabet

  @property
  def vocab_size(self) -> int:
    return len(self._alphabet) + _NUM_SPECIAL

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def bos_id(self) -> int:
    return BOS_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  def encode(
      self, text: str, *, add_bos: bool = False, add_eos: bool = False
  ) -> list[int]:
    """Maps each character of `text` to its id.

    Args:
      text: the string to encode.
      add_bos: prepend the bos id.
      add_eos: append the eos id.

    Returns:
      The ids, one per character plus the requested specials.

    Raises:
      ValueError: if `text` holds a character outside the alphabet.
    """
    ids = [BOS_ID] if add_bos else []
    for position, char in enumerate(text):
      token = self._char_to_id.get(char)
      if token is None:
        raise ValueError(
            f'character {char!r} at position {position} of {text!r} is not '
            f'in the alphabet {self._alphabet!r}'
        )
      ids.append(token)
    if add_eos:
      ids.append(EOS_ID)
    return ids

  def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
    """Maps ids back to text.

    Args:
      ids: token ids; any sequence of ints, a 1-D numpy int array included.
      stop_at_eos: if True, ignore everything from the first eos on (sampled
        responses keep going after eos until the fixed length); if False, eos
        ids are dropped like pad and bos.

    Returns:
      The decoded string, without special tokens.

    Raises:
      ValueError: if an id is outside [0, vocab_size).
    """
    chars = []
    for token in ids:
      token = int(token)  # numpy ints would otherwise miss the fast paths.
      if token == EOS_ID:
        if stop_at_eos:
          break
        continue
      if token in (PAD_ID, BOS_ID):
        continue
      index = token - _NUM_SPECIAL
      if not 0 <= index < len(self._alphabet):
        raise ValueError(
            f'id {token} is outside the vocabulary [0, {self.vocab_size})'
        )
      chars.append(self._alphabet[index])
    return ''.join(chars)

r"""Trains the bundled demo tokenizer on text of the arithmetic task (offline).

  python scripts/train_demo_tokenizer.py \
      [--output=score_jax/assets/arithmetic.model]

The result is committed as score_jax/assets/arithmetic.model; rerun this after
changing the task's text. Any other SentencePiece model with Gemma's turn
markers can be used instead through config.tokenizer_path.
"""

from absl import app, flags

from score_jax import tokenizer
from score_jax.tasks import arithmetic

_OUTPUT = flags.DEFINE_string(
  "output", tokenizer.DEMO_MODEL_PATH, "Where to write the .model file."
)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 512, "Vocabulary size.")
_NUM_TEXTS = flags.DEFINE_integer("num_texts", 20_000, "Texts to train on.")


def main(argv):
  del argv
  sentences = list(arithmetic.corpus_text(_NUM_TEXTS.value, seed=0))
  sentences.append(arithmetic.INSTRUCTION)
  tokenizer.train(
    sentences, _OUTPUT.value, _VOCAB_SIZE.value, user_symbols=["user", "model"]
  )
  tok = tokenizer.Tokenizer(_OUTPUT.value)
  print(f"wrote {_OUTPUT.value}: {tok.vocab_size} pieces")


if __name__ == "__main__":
  app.run(main)

"""The text side of every input: chat templates and the scorer's text (``templates``), and
the tokenizers a model folder brings, found and checked against the embeddings they feed
(``tokenizer``, with the char tokenizer of models built in code)."""

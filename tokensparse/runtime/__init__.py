"""Runtime pieces spliced into graphs: the tokensparse:: custom ops."""

"""One module per `sft` subcommand; each exposes `command` and keeps heavy imports inside it."""

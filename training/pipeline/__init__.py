"""Orchestration only: run the stages in order (`runner`) and write the report (`report`)."""

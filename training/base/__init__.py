"""Stage 0: assemble a Conan base repo from real parts (`build_base`); the pipeline's small base (`small_base`) and
its text distillation (`distill_text`)."""

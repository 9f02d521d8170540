"""Stage 0: assemble a Conan base repo from real parts (`build_base`), the pipeline's small base and text distillation."""

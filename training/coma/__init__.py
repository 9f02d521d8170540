"""Stage C (CoMa compressed pre-training, before contrastive training): training/coma/stage.py."""

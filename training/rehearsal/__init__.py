"""Stage B: balanced multi-modal rehearsal of the fused (+ recovered) model (`rehearse`)."""

"""build_base writes the chat layout the root processor defines (`processing_conan.build_chat_template`), once."""

from __future__ import annotations

import numpy as np
from PIL import Image

from training.common import hub_code


def test_saved_chat_template_is_the_processors_and_renders_its_layout(tiny_repo):
    processing = hub_code.load("processing_conan")
    processor = hub_code.ConanProcessor.from_pretrained(tiny_repo)
    assert processor.audio_start_token == "<|audio_start|>" and processor.audio_token == "<|AUDIO|>"
    expected = processing.build_chat_template(processor.audio_token, processor.audio_start_token,
                                              processor.audio_end_token)
    assert processor.chat_template == expected
    saved = [p for p in tiny_repo.iterdir() if "chat_template" in p.name]
    assert saved, "the repo carries its chat template"
    assert any(expected in p.read_text() or expected == p.read_text() for p in saved)

    # The Jinja form and the Python form (`render`, what the model is fed) give the same text.
    raw = {"text": "a cat", "image": Image.new("RGB", (32, 32)),
           "audio": {"array": np.zeros(1600, dtype=np.float32), "sampling_rate": 16000}}
    parsed, _ = processor.parse_input(raw, 0)
    messages = [{"role": "system", "content": "Find it."},
                {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "a cat"}]}]
    jinja = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template, tokenize=False,
                                                    add_generation_prompt=True)
    assert jinja == processor.render(parsed, "Find it.")

"""Real sampled instruments: a note of each General MIDI program rendered from the Fluid R3 GM SoundFont.

Why one fluidsynth call per split: loading the 140 MB SoundFont dominates, so all the notes of a split go into
one MIDI file (one note every ``SLOT_S`` seconds) that is rendered once and cut into clips. Items are
(program, register) with registers low/middle/high (MIDI notes 48/60/72). Split: ``split_of("gm:<program>:<note>")``.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from training.common.splits import split_of

from .common import BuildContext, SourceInfo, SourceMissing, balanced_take, make_pair, pick_negatives
from .install import INSTALL

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
SAMPLE_RATE = 16_000
SLOT_S = 2.0      # seconds per note in the rendered stream (note on 1.2 s, then release)
NOTE_S = 1.2
REGISTERS = {48: "low", 60: "middle", 72: "high"}
FAMILIES = ("piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass", "reed",
            "pipe", "synth lead", "synth pad", "synth effects", "ethnic", "percussive", "sound effects")
# General MIDI Level 1 program names (the standard's sound set, 0-based program numbers).
GM_PROGRAMS = (
    "acoustic grand piano", "bright acoustic piano", "electric grand piano", "honky-tonk piano", "electric piano 1",
    "electric piano 2", "harpsichord", "clavinet", "celesta", "glockenspiel", "music box", "vibraphone", "marimba",
    "xylophone", "tubular bells", "dulcimer", "drawbar organ", "percussive organ", "rock organ", "church organ",
    "reed organ", "accordion", "harmonica", "tango accordion", "nylon string guitar", "steel string guitar",
    "jazz electric guitar", "clean electric guitar", "muted electric guitar", "overdriven guitar",
    "distortion guitar", "guitar harmonics", "acoustic bass", "fingered electric bass", "picked electric bass",
    "fretless bass", "slap bass 1", "slap bass 2", "synth bass 1", "synth bass 2", "violin", "viola", "cello",
    "contrabass", "tremolo strings", "pizzicato strings", "orchestral harp", "timpani", "string ensemble 1",
    "string ensemble 2", "synth strings 1", "synth strings 2", "choir aahs", "voice oohs", "synth voice",
    "orchestra hit", "trumpet", "trombone", "tuba", "muted trumpet", "french horn", "brass section", "synth brass 1",
    "synth brass 2", "soprano sax", "alto sax", "tenor sax", "baritone sax", "oboe", "english horn", "bassoon",
    "clarinet", "piccolo", "flute", "recorder", "pan flute", "blown bottle", "shakuhachi", "whistle", "ocarina",
    "square lead synth", "sawtooth lead synth", "calliope lead synth", "chiff lead synth", "charang lead synth",
    "voice lead synth", "fifths lead synth", "bass and lead synth", "new age pad", "warm pad", "polysynth pad",
    "choir pad", "bowed pad", "metallic pad", "halo pad", "sweep pad", "rain effect", "soundtrack effect",
    "crystal effect", "atmosphere effect", "brightness effect", "goblins effect", "echoes effect", "sci-fi effect",
    "sitar", "banjo", "shamisen", "koto", "kalimba", "bagpipe", "fiddle", "shanai", "tinkle bell", "agogo",
    "steel drums", "woodblock", "taiko drum", "melodic tom", "synth drum", "reverse cymbal", "guitar fret noise",
    "breath noise", "seashore", "bird tweet", "telephone ring", "helicopter", "applause", "gunshot",
)
assert len(GM_PROGRAMS) == 128

INFO = SourceInfo(
    name="fluid-soundfont-gm-instruments",
    modality="audio",
    licence="Fluid R3 GM SoundFont MIT (Debian fluid-soundfont-gm); rendered with fluidsynth (LGPL-2.1+)",
    obtained=f"fluidsynth -ni -R 0 -C 0 -r {SAMPLE_RATE} {SOUNDFONT} <notes.mid>: one note per (program, register), "
             f"{NOTE_S} s held, cut into {SLOT_S} s clips",
    split_rule='training.common.splits.split_of("gm:<program>:<midi note>")',
    install=INSTALL["instruments"],
)
INSTRUCTION = "Identify the instrument and register of the note in the recording."


def caption(program: int, note: int) -> str:
    """E.g. (40, 72) -> 'a violin playing a high note'; sound effects -> 'the sound of a helicopter'."""
    name = GM_PROGRAMS[program]
    if program >= 120:
        return f"the sound of {'a ' if name not in ('applause', 'breath noise', 'guitar fret noise') else ''}{name}"
    article = "an" if name[0] in "aeiou" else "a"
    return f"{article} {name} playing a {REGISTERS[note]} note"


def _vlq(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(reversed(out))


def midi_file(notes: list[tuple[int, int]], tpq: int = 480, bpm: int = 120) -> bytes:
    """A format-0 Standard MIDI File: for each (program, note) a program change and one note, ``SLOT_S`` apart."""
    ticks_per_s = tpq * bpm / 60
    slot, held = int(SLOT_S * ticks_per_s), int(NOTE_S * ticks_per_s)
    ev = bytearray(b"\x00\xff\x51\x03" + (60_000_000 // bpm).to_bytes(3, "big"))
    for k, (program, note) in enumerate(notes):
        ev += _vlq(0 if k == 0 else slot - held) + bytes([0xC0, program])
        ev += _vlq(0) + bytes([0x90, note, 100]) + _vlq(held) + bytes([0x80, note, 0])
    ev += _vlq(slot - held) + b"\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, tpq) + b"MTrk" + struct.pack(">I", len(ev)) + bytes(ev)


def render(notes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Render the notes with fluidsynth in one call; returns one mono float32 clip per note (``SLOT_S`` long)."""
    exe = shutil.which("fluidsynth")
    if exe is None or not SOUNDFONT.exists():
        raise SourceMissing(f"fluidsynth or {SOUNDFONT} missing: {INSTALL['instruments']}")
    import soundfile as sf

    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = Path(tmp) / "notes.mid", Path(tmp) / "notes.wav"
        mid.write_bytes(midi_file(notes))
        cmd = [exe, "-ni", "-q", "-R", "0", "-C", "0", "-g", "0.8", "-r", str(SAMPLE_RATE), "-T", "wav",
               "-F", str(wav), str(SOUNDFONT), str(mid)]
        res = subprocess.run(cmd, capture_output=True)
        if res.returncode != 0 or not wav.exists():
            raise RuntimeError(f"fluidsynth failed ({' '.join(cmd)}): {res.stderr.decode(errors='replace')}")
        data, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    if sr != SAMPLE_RATE:
        raise RuntimeError(f"fluidsynth wrote {sr} Hz, expected {SAMPLE_RATE}")
    mono = data.mean(axis=1)
    n = int(SLOT_S * SAMPLE_RATE)
    mono = np.pad(mono, (0, max(0, n * len(notes) - mono.size)))
    return [mono[k * n:(k + 1) * n].copy() for k in range(len(notes))]


def check(ctx: BuildContext) -> None:
    """Raise SourceMissing unless fluidsynth and the Fluid R3 GM SoundFont are installed."""
    if shutil.which("fluidsynth") is None or not SOUNDFONT.exists():
        raise SourceMissing(f"fluidsynth or {SOUNDFONT} missing: {INSTALL['instruments']}")


def build(split: str, cap: int, ctx: BuildContext) -> list[dict]:
    """Up to ``cap`` recording->caption pairs balanced over the 16 GM families; negatives are other captions, the
    same family first (e.g. a viola for a violin)."""
    if shutil.which("fluidsynth") is None or not SOUNDFONT.exists():
        raise SourceMissing(f"fluidsynth or {SOUNDFONT} missing: {INSTALL['instruments']}")
    rng = ctx.rng(INFO.name, split)
    everything = [(p, n) for p in range(128) for n in REGISTERS]
    items = [(p, n) for p, n in everything if split_of(f"gm:{p}:{n}") == split]
    chosen = balanced_take(items, lambda t: t[0] // 8, cap, rng)
    if not chosen:
        return []
    clips = render(chosen)
    pairs = []
    for k, ((p, n), clip) in enumerate(zip(chosen, clips)):
        peak = float(np.abs(clip).max())
        if peak < 1e-4:
            continue  # a silent render (program without a sample at this pitch) is no data
        clip = clip * (0.5 / peak)  # same peak level for every clip: loudness is no cue to the instrument
        rel = ctx.media.audio(clip, SAMPLE_RATE, f"gm/{p:03d}-{n}.wav")
        # label-text negatives (like the digit names of FSDD): other instruments, same family first
        neg = pick_negatives(len(everything), -1, ctx.n_negatives, rng, ok=lambda j: everything[j][0] != p,
                             prefer=lambda j: everything[j][0] // 8 == p // 8)
        negatives = [{"text": caption(*everything[j])} for j in neg]
        pairs.append(make_pair({"audio": rel}, {"text": caption(p, n)}, negatives,
                               INFO.name, INSTRUCTION, key=f"gm:{p}:{n}", label=GM_PROGRAMS[p],
                               family=FAMILIES[p // 8], midi_note=n))
    return pairs

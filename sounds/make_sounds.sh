#!/usr/bin/env bash
# Generate the prompts and tones used by the reference IVR flow.
# Output: 8 kHz mono 16-bit PCM WAV files next to this script.
# Needs espeak-ng and sox (Debian: apt-get install espeak-ng sox).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
voice="${ESPEAK_VOICE:-en-us}"
speed="${ESPEAK_SPEED:-150}"

for tool in espeak-ng sox; do
    command -v "$tool" >/dev/null || { echo "make_sounds.sh: $tool not found" >&2; exit 1; }
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Output format shared by every file.
fmt=(-r 8000 -c 1 -b 16 -e signed-integer)
# Repeatable output (fixed random seed, no dither) so a re-run does not change committed files.
sox() { command sox -R -D "$@"; }

# speak NAME "TEXT" [WPM]: espeak-ng -> sox. Leading silence trimmed, pauses
# inside the sentence capped at 0.35 s, trailing silence cut to 0.35 s plus 0.1 s of padding,
# peak normalised to -3 dBFS.
speak() {
    local name="$1" text="$2" wpm="${3:-$speed}"
    espeak-ng -v "$voice" -s "$wpm" -w "$tmp/$name.raw.wav" "$text"
    sox "$tmp/$name.raw.wav" "${fmt[@]}" "$here/$name.wav" \
        rate 8000 silence -l 1 0.02 0.5% -1 0.35 0.5% \
        pad 0 0.1 gain -n -3
}

speak welcome "Welcome to pbx."
speak menu    "For sales, press 1. For support, press 2. For the operator, press 0." 175
speak invalid "That is not a valid choice."
speak timeout "We did not receive your choice."
speak error   "Sorry, something went wrong. Goodbye."
speak goodbye "Thank you for calling. Goodbye."
speak voicemail_greeting "Please leave a message after the tone. Press the pound key when you are done."

# Beep: 0.25 s, 1000 Hz sine at -6 dBFS, 5 ms fades against clicks.
sox -n "${fmt[@]}" "$here/beep.wav" synth 0.25 sine 1000 fade 0.005 0.25 0.005 gain -n -6

# Hold music: four soft chords of 2 s each (C, Am, F, G), each note a sine with a
# gentle fade in/out so the 8 s loop joins without clicks; peak ~ -18 dBFS.
chord() {
    local out="$1"; shift
    sox -n "${fmt[@]}" "$out" synth 2 sine "$1" sine "$2" sine "$3" \
        remix - fade q 0.25 2 0.5
}
chord "$tmp/c1.wav" 261.63 329.63 392.00
chord "$tmp/c2.wav" 220.00 261.63 329.63
chord "$tmp/c3.wav" 174.61 220.00 261.63
chord "$tmp/c4.wav" 196.00 246.94 293.66
sox "$tmp/c1.wav" "$tmp/c2.wav" "$tmp/c3.wav" "$tmp/c4.wav" "${fmt[@]}" "$here/hold.wav" gain -n -18

for f in welcome menu invalid timeout error goodbye voicemail_greeting beep hold; do
    printf '%-24s %6.2f s\n' "$f.wav" "$(soxi -D "$here/$f.wav")"
done

"""whisper-stream: real-time streaming speech recognition on Whisper."""

__version__ = "0.1.0"

"""The sans-I/O core: PCM in, resampling, VAD, window, agreement, events and the stream session, counted on a
sample timeline with an injected clock. It imports neither torch nor websockets; it asks the engine for work
with :class:`~streaming.core.messages.WindowRequest` and takes its :class:`~streaming.core.messages.WindowReply`."""

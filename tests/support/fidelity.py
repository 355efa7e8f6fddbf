"""The fixed texts the real model is judged on, shared by its tests and benchmarks/inference.py."""

from __future__ import annotations

#: The prompt whose greedy answer must follow the float32 reference's.
HEALTH_PROMPT = "Give me three tips for staying healthy."

#: The timed prompt of the benchmarks: its greedy answer is longer than 128 tokens, so
#: every engine decodes the same count without stopping at an end token.
LONG_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."

#: A chat of more than 150 tokens over which top-1 agreement and KL are measured.
FIDELITY_TEXT = [
    ("system", "You are a helpful assistant for people who look after small gardens."),
    (
        "user",
        "My tomato plants have yellow leaves at the bottom, and the new growth looks pale. "
        "I water them every evening and the soil stays wet. What is going on, and what "
        "should I change this week?",
    ),
    (
        "assistant",
        "Yellow lower leaves with pale new growth usually point to two things at once: the "
        "roots are sitting in soil that is too wet, and the plant is short of nitrogen. "
        "Water only when the top few centimetres of soil are dry, and water in the morning "
        "so the leaves dry during the day. Add a balanced fertilizer at half strength, and "
        "remove the worst leaves so the plant can spend its energy on new growth. Check the "
        "drainage holes of the pots as well, because standing water damages roots quickly.",
    ),
]

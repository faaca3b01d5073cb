"""Offline calibration of head patterns (LServe / DuoAttention streaming heads): learn per-KV-head
gates on a frozen model (`heads`), and measure a pattern's passkey retrieval (`retrieval`), with
the training code's plain-torch Llama made gated (`gated_model`, loaded by `checkpoint`). What it
writes is `omniserve.formats.head_pattern`; it runs models, so it sits beside `omniserve.quantize`.
"""

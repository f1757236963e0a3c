"""The pure decision core: values in, values out, time passed in. No I/O here."""

"""The `.rdonnx` artifact: the file format, the SuRP stream, parallel decoding, and load /
open_session / decompress for users."""

"""What ``qil_keras.quantize`` did to each layer, as a structured table."""

import dataclasses

__all__ = ["ReportRow", "QuantizationReport"]


@dataclasses.dataclass(frozen=True)
class ReportRow:
    """One layer: what was done to it and why."""

    layer: str
    layer_class: str
    action: str  # "quantized", "inserted", "kept", "float", "inlined" (a nested model)
    w_bits: int | None
    a_bits: int | None
    reason: str


class QuantizationReport:
    """Rows for every layer of the quantized model (and each inserted layer).

    ``report.rows``: all rows; ``report.float_layers``: layers left in float
    with the reason; ``report.to_dicts()``: plain dicts (JSON-ready);
    ``str(report)``: a fixed-width table.
    """

    def __init__(self, rows):
        self.rows = tuple(rows)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, layer_name):
        for row in self.rows:
            if row.layer == layer_name:
                return row
        raise KeyError(f"no layer named {layer_name!r} in the report")

    @property
    def float_layers(self):
        return tuple(row for row in self.rows if row.action == "float")

    def to_dicts(self):
        return [dataclasses.asdict(row) for row in self.rows]

    def __str__(self):
        header = ("layer", "class", "action", "w_bits", "a_bits", "reason")
        cells = [header] + [
            (r.layer, r.layer_class, r.action, "" if r.w_bits is None else str(r.w_bits),
             "" if r.a_bits is None else str(r.a_bits), r.reason)
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5]
                 for row in cells]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self):
        counts = {}
        for row in self.rows:
            counts[row.action] = counts.get(row.action, 0) + 1
        return f"QuantizationReport({counts})"

"""Regenerate the demo shop's warranty card PDF (bot/demo_shop/knowledge/warranty-card.en.pdf).

The PDF exists so the demo knowledge base has one document of each kept kind; run this after
changing the text below: `.venv/bin/python scripts/make_warranty_card.py` (needs fpdf2, a dev
dependency). ASCII text only, so the core Helvetica font is enough.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fpdf import FPDF

OUT = Path(__file__).resolve().parent.parent / "bot/demo_shop/knowledge/warranty-card.en.pdf"

TITLE = "Demo Shop Warranty Card"

SECTIONS: list[tuple[str, list[str]]] = [
    (
        "Keep this card",
        [
            "This card comes with every electronic product and home appliance sold by Demo "
            "Shop. Your order number is your proof of purchase: you need neither this card nor "
            "a paper invoice to claim, but the card lists what the warranty covers.",
        ],
    ),
    (
        "Warranty periods",
        [
            "Electronics: 1-year manufacturer warranty (12 months) from the delivery date.",
            "27-inch 4K Monitor: 3 years on the panel. USB-C Cable 2m: 6 months.",
            "Robot Vacuum R7 and HEPA Air Purifier: 2 years.",
            "Electric Kettle 1.7L and Smart Rice Cooker 4L: 1 year, free repair of "
            "manufacturing defects.",
        ],
    ),
    (
        "Not covered",
        [
            "Accidental damage, liquid damage beyond the product's water rating, repairs by "
            "anyone other than the Demo Shop service centre, consumables (brushes, filters, "
            "mop pads, ear tips) and normal wear.",
        ],
    ),
    (
        "How to claim",
        [
            "In the Demo Shop app open My orders, choose the order, tap Apply for after-sales "
            "and then Warranty repair. Choose Free pick-up: during the warranty we pay the "
            "shipping both ways to the service centre in Wuhan. Repairs take up to 7 working "
            "days from the day the product arrives.",
            "Service hotline: 400-820-1688, every day 9:00-22:00 (Beijing time).",
        ],
    ),
]


def build(out: Path = OUT) -> Path:
    pdf = FPDF(format="A4")
    pdf.set_title(TITLE)
    pdf.set_author("Demo Shop")
    # a fixed date keeps the bytes stable: regenerating unchanged text changes nothing
    pdf.set_creation_date(datetime(2026, 1, 1, tzinfo=UTC))
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.multi_cell(0, 9, TITLE, new_x="LMARGIN", new_y="NEXT")
    for heading, paragraphs in SECTIONS:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 12)
        pdf.multi_cell(0, 7, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 10)
        for text in paragraphs:
            pdf.multi_cell(0, 5, text, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(2)
    pdf.output(str(out))
    return out


if __name__ == "__main__":
    print(build())

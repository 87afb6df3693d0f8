"""The multilingual concept lexicon: CLDR names (from ``babel``) of the same concepts in many
languages, placed in matched template sentences.

Categories and their concepts (CLDR keys): ``countries`` (ISO 3166 territory codes),
``languages`` (ISO 639 codes), ``months`` (1-12), ``weekdays`` (0 = Monday .. 6). Names are
CLDR's *stand-alone* forms for months and weekdays (the nominative in languages with cases), so
each template puts the name where a nominative or a label fits: a label (``Country: {}.``), a
predicate (``The country is called {}.``) and a subject (``{} is a beautiful country.``). A
sentence that starts with the name gets its first letter upper-cased (CLDR writes French and
Spanish months in lower case). The templates were written for jsae; the names are CLDR's.
"""

from __future__ import annotations

CATEGORIES = ("countries", "languages", "months", "weekdays")

CONCEPTS = {
    "countries": ("FR", "DE", "ES", "IT", "PT", "NL", "SE", "PL", "RU", "TR", "JP", "CN", "US", "GB",
                  "IN", "BR", "MX", "CA", "AU", "EG", "GR", "CH", "AT", "BE", "NO", "FI", "DK", "IE",
                  "AR", "KR", "ZA", "NG", "KE", "IR", "SA", "IL", "UA", "VN", "TH", "ID"),
    "languages": ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "pl", "ru", "tr", "ja", "zh", "ar",
                  "hi", "ko", "el", "he", "fi", "da", "uk", "cs", "hu", "vi"),
    "months": tuple(range(1, 13)),
    "weekdays": tuple(range(7)),
}

# language -> category -> three templates (label, predicate, subject); "{}" is the name
TEMPLATES: dict[str, dict[str, tuple[str, str, str]]] = {
    "en": {"countries": ("Country: {}.", "The country is called {}.", "{} is a beautiful country."),
           "languages": ("Language: {}.", "She speaks {}.", "{} is a language."),
           "months": ("Month: {}.", "Now it is {}.", "{} is a month of the year."),
           "weekdays": ("Day: {}.", "Today is {}.", "{} is a day of the week.")},
    "fr": {"countries": ("Pays : {}.", "Le pays s'appelle {}.", "{} est un beau pays."),
           "languages": ("Langue : {}.", "Elle parle {}.", "{} est une langue."),
           "months": ("Mois : {}.", "Nous sommes en {}.", "{} est un mois de l'année."),
           "weekdays": ("Jour : {}.", "Aujourd'hui, c'est {}.", "{} est un jour de la semaine.")},
    "es": {"countries": ("País: {}.", "El país se llama {}.", "{} es un país hermoso."),
           "languages": ("Idioma: {}.", "Ella habla {}.", "{} es un idioma."),
           "months": ("Mes: {}.", "Estamos en {}.", "{} es un mes del año."),
           "weekdays": ("Día: {}.", "Hoy es {}.", "{} es un día de la semana.")},
    "de": {"countries": ("Land: {}.", "Das Land heißt {}.", "{} ist ein schönes Land."),
           "languages": ("Sprache: {}.", "Sie spricht {}.", "{} ist eine Sprache."),
           "months": ("Monat: {}.", "Jetzt ist {}.", "{} ist ein Monat des Jahres."),
           "weekdays": ("Tag: {}.", "Heute ist {}.", "{} ist ein Wochentag.")},
    "it": {"countries": ("Paese: {}.", "Il paese si chiama {}.", "{} è un bel paese."),
           "languages": ("Lingua: {}.", "Lei parla {}.", "{} è una lingua."),
           "months": ("Mese: {}.", "Siamo a {}.", "{} è un mese dell'anno."),
           "weekdays": ("Giorno: {}.", "Oggi è {}.", "{} è un giorno della settimana.")},
    "pt": {"countries": ("País: {}.", "O país se chama {}.", "{} é um belo país."),
           "languages": ("Idioma: {}.", "Ela fala {}.", "{} é um idioma."),
           "months": ("Mês: {}.", "Estamos em {}.", "{} é um mês do ano."),
           "weekdays": ("Dia: {}.", "Hoje é {}.", "{} é um dia da semana.")},
    "nl": {"countries": ("Land: {}.", "Het land heet {}.", "{} is een mooi land."),
           "languages": ("Taal: {}.", "Zij spreekt {}.", "{} is een taal."),
           "months": ("Maand: {}.", "Het is nu {}.", "{} is een maand van het jaar."),
           "weekdays": ("Dag: {}.", "Vandaag is het {}.", "{} is een dag van de week.")},
    "sv": {"countries": ("Land: {}.", "Landet heter {}.", "{} är ett vackert land."),
           "languages": ("Språk: {}.", "Hon talar {}.", "{} är ett språk."),
           "months": ("Månad: {}.", "Nu är det {}.", "{} är en månad på året."),
           "weekdays": ("Dag: {}.", "Idag är det {}.", "{} är en veckodag.")},
    "pl": {"countries": ("Kraj: {}.", "Ten kraj to {}.", "{} to piękny kraj."),
           "languages": ("Język: {}.", "Jej ojczysty język to {}.", "{} to język."),
           "months": ("Miesiąc: {}.", "Teraz jest {}.", "{} to miesiąc roku."),
           "weekdays": ("Dzień: {}.", "Dzisiaj jest {}.", "{} to dzień tygodnia.")},
    "ru": {"countries": ("Страна: {}.", "Эта страна называется {}.", "{} — красивая страна."),
           "languages": ("Язык: {}.", "Её родной язык — {}.", "{} — это язык."),
           "months": ("Месяц: {}.", "Сейчас {}.", "{} — месяц года."),
           "weekdays": ("День: {}.", "Сегодня {}.", "{} — день недели.")},
    "tr": {"countries": ("Ülke: {}.", "Bu ülkenin adı {}.", "{} güzel bir ülkedir."),
           "languages": ("Dil: {}.", "Ana dili {}.", "{} bir dildir."),
           "months": ("Ay: {}.", "Bu ay {}.", "{} yılın bir ayıdır."),
           "weekdays": ("Gün: {}.", "Bugün {}.", "{} haftanın bir günüdür.")},
    "ja": {"countries": ("国：{}。", "この国の名前は{}です。", "{}は美しい国です。"),
           "languages": ("言語：{}。", "彼女の母語は{}です。", "{}は言語です。"),
           "months": ("月：{}。", "今は{}です。", "{}は一年の月の一つです。"),
           "weekdays": ("曜日：{}。", "今日は{}です。", "{}は週の一日です。")},
    "zh": {"countries": ("国家：{}。", "这个国家叫{}。", "{}是一个美丽的国家。"),
           "languages": ("语言：{}。", "她的母语是{}。", "{}是一种语言。"),
           "months": ("月份：{}。", "现在是{}。", "{}是一年中的一个月。"),
           "weekdays": ("星期：{}。", "今天是{}。", "{}是一周中的一天。")},
}
LANGS = tuple(TEMPLATES)


def cldr_name(lang: str, category: str, concept) -> str:
    """CLDR's name of ``concept`` in ``lang`` (``babel``); KeyError where CLDR has none."""
    from jsae.errors import require

    loc = require("babel", "demo", "the multilingual concept lexicon").Locale.parse(lang)
    if category == "countries":
        return loc.territories[concept]
    if category == "languages":
        return loc.languages[concept]
    if category == "months":
        return loc.months["stand-alone"]["wide"][concept]
    if category == "weekdays":
        return loc.days["stand-alone"]["wide"][concept]
    raise KeyError(category)


def names(langs, categories) -> dict[str, dict[object, dict[str, str]]]:
    """``{category: {concept: {lang: name}}}`` for every listed concept CLDR names in every
    language of ``langs`` (a concept missing in one language is left out)."""
    out = {}
    for cat in categories:
        rows = {}
        for c in CONCEPTS[cat]:
            try:
                rows[c] = {lang: cldr_name(lang, cat, c) for lang in langs}
            except KeyError:
                continue
        out[cat] = rows
    return out


def sentence(template: str, name: str) -> tuple[str, str, str]:
    """``(prefix, name, suffix)`` of the template filled with ``name`` (first letter upper-cased
    where the sentence starts with the name)."""
    pre, post = template.split("{}")
    if not pre:
        name = name[:1].upper() + name[1:]
    return pre, name, post


__all__ = ["CATEGORIES", "CONCEPTS", "LANGS", "TEMPLATES", "cldr_name", "names", "sentence"]

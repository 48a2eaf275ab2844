// A small JSON reader for the conformance vectors (Mono's minimal install has no JSON
// library): objects become Dictionary<string, object>, arrays List<object>, numbers long
// (the vectors keep every number below 2^53; u64 fields are strings), plus string, bool, null.

using System;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace Tether.Tests
{
    static class Json
    {
        public static object Parse(string s)
        {
            int i = 0;
            var v = Value(s, ref i);
            Ws(s, ref i);
            if (i != s.Length) throw new FormatException("trailing characters at " + i);
            return v;
        }

        static void Ws(string s, ref int i)
        {
            while (i < s.Length && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++;
        }

        static object Value(string s, ref int i)
        {
            Ws(s, ref i);
            char c = s[i];
            if (c == '{')
            {
                var o = new Dictionary<string, object>();
                i++;
                Ws(s, ref i);
                if (s[i] == '}') { i++; return o; }
                while (true)
                {
                    Ws(s, ref i);
                    var k = Str(s, ref i);
                    Ws(s, ref i);
                    if (s[i++] != ':') throw new FormatException("':' expected at " + (i - 1));
                    o[k] = Value(s, ref i);
                    Ws(s, ref i);
                    if (s[i] == ',') { i++; continue; }
                    if (s[i] == '}') { i++; return o; }
                    throw new FormatException("',' or '}' expected at " + i);
                }
            }
            if (c == '[')
            {
                var a = new List<object>();
                i++;
                Ws(s, ref i);
                if (s[i] == ']') { i++; return a; }
                while (true)
                {
                    a.Add(Value(s, ref i));
                    Ws(s, ref i);
                    if (s[i] == ',') { i++; continue; }
                    if (s[i] == ']') { i++; return a; }
                    throw new FormatException("',' or ']' expected at " + i);
                }
            }
            if (c == '"') return Str(s, ref i);
            if (s.Substring(i).StartsWith("true")) { i += 4; return true; }
            if (s.Substring(i, Math.Min(5, s.Length - i)) == "false") { i += 5; return false; }
            if (s.Substring(i, Math.Min(4, s.Length - i)) == "null") { i += 4; return null; }
            int start = i;
            while (i < s.Length && "-+0123456789.eE".IndexOf(s[i]) >= 0) i++;
            return long.Parse(s.Substring(start, i - start), CultureInfo.InvariantCulture);
        }

        static string Str(string s, ref int i)
        {
            if (s[i] != '"') throw new FormatException("string expected at " + i);
            i++;
            var b = new StringBuilder();
            while (s[i] != '"')
            {
                char c = s[i++];
                if (c != '\\') { b.Append(c); continue; }
                char e = s[i++];
                switch (e)
                {
                    case 'n': b.Append('\n'); break;
                    case 't': b.Append('\t'); break;
                    case 'r': b.Append('\r'); break;
                    case 'b': b.Append('\b'); break;
                    case 'f': b.Append('\f'); break;
                    case 'u': b.Append((char)int.Parse(s.Substring(i, 4), NumberStyles.HexNumber)); i += 4; break;
                    default: b.Append(e); break;
                }
            }
            i++;
            return b.ToString();
        }

        /// <summary>Every key of want is in got with the same value.</summary>
        public static bool Subset(object want, object got)
        {
            var w = want as Dictionary<string, object>;
            if (w != null)
            {
                var g = got as Dictionary<string, object>;
                if (g == null) return false;
                foreach (var kv in w)
                {
                    object gv;
                    if (!g.TryGetValue(kv.Key, out gv) || !Subset(kv.Value, gv)) return false;
                }
                return true;
            }
            var wl = want as List<object>;
            if (wl != null)
            {
                var gl = got as List<object>;
                if (gl == null || gl.Count != wl.Count) return false;
                for (int k = 0; k < wl.Count; k++) if (!Subset(wl[k], gl[k])) return false;
                return true;
            }
            return Equals(want, got);
        }

        public static string Show(object v)
        {
            if (v == null) return "null";
            var d = v as Dictionary<string, object>;
            if (d != null)
            {
                var parts = new List<string>();
                foreach (var kv in d) parts.Add("\"" + kv.Key + "\": " + Show(kv.Value));
                return "{" + string.Join(", ", parts) + "}";
            }
            var l = v as List<object>;
            if (l != null) return "[" + string.Join(", ", l.ConvertAll(Show)) + "]";
            if (v is string) return "\"" + v + "\"";
            if (v is bool) return (bool)v ? "true" : "false";
            return v.ToString();
        }
    }
}
